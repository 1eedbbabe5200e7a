"""RL algorithms for textenv: shared PPO/RLHF math (`agents.core`) and the trainers built on it."""
