"""Interop: Stable-Baselines3's own `PPO` fine-tunes a language-model policy through our Gymnasium env.

The policy is an SB3 `MultiInputActorCriticPolicy` whose features extractor is a causal LM's trunk (the hidden
state of the observation's last real token) and whose `action_net` is that LM's own `lm_head`, so at step 0 SB3
samples from the SFT policy. The algorithm is plain `stable_baselines3.PPO`, which differs from `agents.ppo`:
- temperature 1: SB3 samples from `Categorical(logits=lm_head(h))`, the LM's unscaled next-token distribution;
- no KL penalty to a reference policy (SB3 has none): `ent_coef` is the only regulariser, so a learned RM is
  easier to over-optimise (Gao et al. 2022, arXiv 2210.10760);
- no KV cache: every env step re-encodes the whole (P+T)-token observation, and the buffer stores it as float32.
It shows that the env is an ordinary Gymnasium env an off-the-shelf library trains in; `agents.ppo` is the recipe.

    python -m agents.sb3_lm --policy runs/x/sft/model --reward runs/x/rm/model --out-dir runs/x/sb3_ppo
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.policies import MultiInputActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.utils import get_device
from tqdm.auto import tqdm
from transformers import AutoConfig

import textenv  # noqa: F401  (registers the env ids)
from agents.run import RunLogger, cli, finish_run, start_run
from rewards.base import as_reward_fn
from textenv.models import load_causal_lm
from textenv.models.tokens import position_ids_from_mask
from textenv.tasks import get_task
from textenv.tokenizer import load_tokenizer


class LMFeaturesExtractor(BaseFeaturesExtractor):
    """(B, P+T) token observation -> (B, H): the causal LM trunk's last hidden state at the last real token.

    `model` is a causal-LM folder or hub id; `self.lm` holds the whole LM so the policy can use its `lm_head`.
    """

    def __init__(self, observation_space: spaces.Dict, model: str):
        if (not isinstance(observation_space, spaces.Dict)
                or set(observation_space.spaces) != {"input_ids", "attention_mask"}):
            raise ValueError(f"LMFeaturesExtractor needs a Dict(input_ids, attention_mask) space, "
                             f"got {observation_space}")
        lm = load_causal_lm(model)  # dropout off: PPO's ratio is exactly 1 on the first minibatch
        super().__init__(observation_space, features_dim=lm.config.hidden_size)
        self.lm = lm

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        # SB3 hands Box observations over as float32 (preprocess_obs, the rollout buffer): exact for ids < 2**24
        input_ids = observations["input_ids"].long()  # (B, L)
        attention_mask = observations["attention_mask"].long()  # (B, L)
        hidden = self.lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        ).last_hidden_state  # (B, L, H)
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        last = (attention_mask * columns).argmax(-1)  # (B,) the last column whose mask is 1
        return hidden[torch.arange(len(hidden), device=hidden.device), last]  # (B, H)


class LMActorCriticPolicy(MultiInputActorCriticPolicy):
    """An SB3 actor-critic whose logits are the LM's own next-token logits, lm_head(trunk(obs)), and whose value
    is a zero-initialised Linear(H, 1) on the same features (one shared trunk). `action_net` *is* the LM's
    `lm_head` module (tied to the input embeddings in GPT-2), so the LM that `save_pretrained` writes carries
    the learned head. Use: `PPO(LMActorCriticPolicy, env, policy_kwargs=dict(features_extractor_kwargs=dict(
    model="runs/x/sft/model")))`; the env's action space must be Discrete(the LM's logits width).
    """

    def __init__(self, observation_space, action_space, lr_schedule, net_arch=None, ortho_init=False,
                 share_features_extractor=True, features_extractor_class=LMFeaturesExtractor, **kwargs):
        if net_arch not in (None, []):
            raise ValueError(f"net_arch must be empty (the LM head reads the trunk directly), got {net_arch!r}")
        if ortho_init:
            raise ValueError("ortho_init=True would overwrite the LM's pretrained weights with orthogonal ones")
        if not share_features_extractor:
            raise ValueError("share_features_extractor=False would hold a second copy of the LM trunk for the value")
        super().__init__(observation_space, action_space, lr_schedule, net_arch=[], ortho_init=False,
                         share_features_extractor=True, features_extractor_class=features_extractor_class, **kwargs)

    def _build(self, lr_schedule) -> None:
        self._build_mlp_extractor()  # net_arch=[]: the identity, latent_pi = latent_vf = features (B, H)
        lm_head = self.features_extractor.lm.get_output_embeddings()
        if lm_head.out_features != self.action_space.n:
            raise ValueError(f"action space Discrete({self.action_space.n}) != the LM's {lm_head.out_features} logits; "
                             "make the env with vocab_size=<the LM's vocab_size>")
        self.action_net = lm_head
        self.value_net = torch.nn.Linear(self.features_dim, 1)
        torch.nn.init.zeros_(self.value_net.weight)  # first values 0, not noise (as agents.ppo.ValueHead)
        torch.nn.init.zeros_(self.value_net.bias)
        # parameters() counts a shared module once: the trunk and the (tied) head are optimised once each
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)


class TruncationIsTermination(gym.Wrapper):
    """The response budget ends an episode for real (its score is paid there), but SB3 bootstraps a truncated
    episode with gamma * V(last obs) (https://stable-baselines3.readthedocs.io/en/master/guide/rl_tips.html,
    "timeout handling"), which would pay a full-length response twice. Report the end as a termination."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated or truncated, False, info


class RunLoggerCallback(BaseCallback):
    """Our metrics at the end of each SB3 rollout, at step = env steps (tokens) so far: the mean score and gold
    score of the episodes finished in it, and tokens per second since the previous rollout's end (that span
    holds the previous update too, as agents.ppo's tokens_per_s does)."""

    def __init__(self, run_logger: RunLogger, gold, total_timesteps: int):
        super().__init__()
        self.run_logger, self.gold, self.total = run_logger, gold, total_timesteps
        self.scores, self.prompts, self.responses = [], [], []

    def _on_training_start(self) -> None:
        self.t0, self.steps0 = time.perf_counter(), self.num_timesteps
        self.bar = tqdm(total=self.total, desc="sb3-ppo", unit="tok")

    def _on_step(self) -> bool:
        for done, reward, info in zip(self.locals["dones"], self.locals["rewards"], self.locals["infos"]):
            if done:  # the env's info carries the decoded text at the episode's last step
                self.scores.append(float(reward))
                self.prompts.append(info["prompt"])
                self.responses.append(info["response"])
        self.bar.update(self.training_env.num_envs)
        return True

    def _on_rollout_end(self) -> None:
        now = time.perf_counter()
        metrics = {"charts/tokens_per_s": (self.num_timesteps - self.steps0) / (now - self.t0)}
        if self.scores:  # a rollout shorter than an episode finishes none
            metrics["objective/scores"] = float(np.mean(self.scores))
            metrics["objective/gold"] = float(np.mean(self.gold(self.prompts, self.responses)))
            metrics["charts/episodes"] = len(self.scores)
            self.bar.set_postfix(score=f"{metrics['objective/scores']:.2f}", gold=f"{metrics['objective/gold']:.2f}")
        self.run_logger.log(self.num_timesteps, metrics)
        self.scores, self.prompts, self.responses = [], [], []
        self.t0, self.steps0 = now, self.num_timesteps

    def _on_training_end(self) -> None:
        self.bar.close()


@dataclass
class SB3PPOConfig:
    policy: str = "runs/default/sft/model"
    """Hub id or folder of the causal LM to fine-tune (with its tokenizer, which the env also uses)."""
    reward: str = "runs/default/rm/model"
    """The reward: a sequence-classification folder or hub id (our learned RM), a 'module:attr' callable, or
    'gold' for the task's own gold scorer."""
    env_id: str = "textenv/PositiveReview-v0"
    """An embedded-task env id (its task gives the prompts and the logged gold score)."""
    out_dir: str = "runs/default/sb3_ppo"
    """Run folder: config, metrics.jsonl, tb/, and the final LM in model/ (save_pretrained + tokenizer)."""
    n_envs: int = 8
    """Sub-envs of SB3's DummyVecEnv."""
    total_timesteps: int = 20_000
    """Env steps (= generated tokens) in all."""
    n_steps: int = 256
    """Env steps per sub-env per rollout (SB3's n_steps)."""
    batch_size: int = 256
    """SB3 minibatch size, in tokens."""
    n_epochs: int = 4
    """Passes over each rollout."""
    lr: float = 1e-5
    """Adam learning rate (constant); SB3's default 3e-4 is meant for small MLPs, not a pretrained LM."""
    ent_coef: float = 0.0
    """Entropy bonus: the only brake on drifting from the SFT policy here (no KL penalty)."""
    gamma: float = 1.0
    """Discount; 1 as in RLHF: the score arrives at the last token."""
    seed: int = 0
    """Seed of SB3 (torch, numpy, the envs' prompt draws)."""
    device: str = "auto"
    """torch device for the policy and the reward model; 'auto': cuda if available, else cpu."""
    overwrite: bool = False
    """Delete a previous run with another configuration in out_dir instead of refusing."""

    def __post_init__(self):
        for name in ("n_envs", "total_timesteps", "n_steps", "batch_size", "n_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def sb3_ppo(cfg: SB3PPOConfig) -> Path:
    """Train cfg.policy with plain SB3 PPO in cfg.env_id; return the folder of the final LM."""
    task_name = gym.spec(cfg.env_id).kwargs.get("task")  # TextGen-v1 has no task, hence no gold score
    if task_name is None:
        raise ValueError(f"env_id {cfg.env_id!r} is not an embedded-task env; "
                         f"choose one of {[k for k, v in textenv.ENV_IDS.items() if 'task' in v]}")
    out_dir, complete = start_run(cfg, "sb3_ppo")
    if complete:
        return out_dir / "model"
    device, task = get_device(cfg.device), get_task(task_name)
    tokenizer = load_tokenizer(cfg.policy)  # the env must tokenize with the policy's vocabulary
    # one reward for all sub-envs (a model folder given as a string would load once per sub-env)
    reward_fn = task.gold if cfg.reward == "gold" else as_reward_fn(cfg.reward, device=device)
    # the action space is the LM's logits (SB3's action net is its head), and it must hold every token
    vocab_size = AutoConfig.from_pretrained(cfg.policy).vocab_size
    if vocab_size < len(tokenizer):
        raise ValueError(f"policy {cfg.policy!r} has {vocab_size} logits but its tokenizer {len(tokenizer)} tokens "
                         "(an added PAD?): resize it first, model.resize_token_embeddings(len(tokenizer)), and save "
                         "it with the tokenizer")
    env_kwargs = dict(tokenizer=tokenizer, reward_fn=reward_fn, vocab_size=vocab_size)
    env = make_vec_env(cfg.env_id, n_envs=cfg.n_envs, seed=cfg.seed, env_kwargs=env_kwargs,
                       wrapper_class=TruncationIsTermination)
    model = PPO(
        LMActorCriticPolicy, env, learning_rate=cfg.lr, n_steps=cfg.n_steps, batch_size=cfg.batch_size,
        n_epochs=cfg.n_epochs, gamma=cfg.gamma, ent_coef=cfg.ent_coef, seed=cfg.seed, device=device, verbose=0,
        policy_kwargs=dict(features_extractor_kwargs=dict(model=cfg.policy)),
    )
    # SB3's own log (its losses, progress.csv) into the run folder; left to itself, SB3 makes an empty
    # tempdir/SB3-<time> folder on every learn() that logs nowhere, one per run, never removed
    model.set_logger(configure(str(out_dir / "sb3"), ["csv"]))
    logger = RunLogger(out_dir, resume_step=None)  # no resume: an interrupted run starts over
    model.learn(cfg.total_timesteps, callback=RunLoggerCallback(logger, task.gold, cfg.total_timesteps))
    logger.close()
    # action_net is the LM's lm_head, so the learned head is saved with the LM
    return finish_run(out_dir, model.policy.features_extractor.lm, tokenizer, {"num_timesteps": model.num_timesteps})


def main() -> None:
    sb3_ppo(cli(SB3PPOConfig))


if __name__ == "__main__":
    main()
