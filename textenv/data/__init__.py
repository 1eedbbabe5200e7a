"""Embedded, generated data: the pretraining corpus and the worlds the tasks draw from."""
