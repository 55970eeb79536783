"""MetaOptimize in a plain PyTorch loop: an MLP on scikit-learn's digits, CPU, step sizes to TensorBoard and W&B.

    python examples/plain_loop.py --steps 500 --output-dir runs/examples/plain_loop
    tensorboard --logdir runs/examples/plain_loop/tensorboard

W&B runs offline (files under --output-dir/wandb, `wandb sync` uploads them) unless you are logged in
(`wandb login` or WANDB_API_KEY); WANDB_MODE, when set, decides (`WANDB_MODE=disabled`, or --no-wandb, turns it off).
"""

from __future__ import annotations

import argparse
import netrc
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch.utils.tensorboard import SummaryWriter

from metaopt import MetaOptimize


def train(steps: int, log_every: int, seed: int = 0) -> Iterator[tuple[int, float, dict[str, float]]]:
    """Trains for `steps` steps, yielding (step, loss, optimizer.step_sizes()) every `log_every` steps."""
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = MetaOptimize(model.named_parameters(), base="adamw", meta="lion", alpha0=1e-4, meta_lr=1e-2)
    for step in range(1, steps + 1):
        batch = torch.randint(len(x), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            yield step, loss.item(), optimizer.step_sizes()  # step_sizes() reads from the device: only when logging


def wandb_logger(output_dir: Path, config: dict) -> Callable[[dict, int], None] | None:
    """wandb.log of a run that is offline unless credentials exist; WANDB_MODE, when set, decides."""
    import wandb

    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        try:
            credentials = netrc.netrc().authenticators("api.wandb.ai")  # where `wandb login` writes them
        except (FileNotFoundError, netrc.NetrcParseError):
            credentials = None
        mode = "online" if os.environ.get("WANDB_API_KEY") or credentials else "offline"
    if mode == "disabled":
        return None
    run = wandb.init(project="metaopt-examples", mode=mode, dir=str(output_dir), config=config)
    return lambda values, step: run.log(values, step=step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--output-dir", default="runs/examples/plain_loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-wandb", action="store_true")
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(output_dir / "tensorboard"))
    log_wandb = None if args.no_wandb else wandb_logger(output_dir, vars(args))
    for step, loss, step_sizes in train(args.steps, args.log_every, args.seed):
        values = {"train/loss": loss, **step_sizes}  # step_size, or step_size/<block> with blocks="param_group"
        for name, value in values.items():
            writer.add_scalar(name, value, step)
        if log_wandb is not None:
            log_wandb(values, step)
    writer.close()
    print(f"step {step}: loss {loss:.3f}, step_size {step_sizes['step_size']:.3g}; "
          f"TensorBoard: {output_dir}/tensorboard")


if __name__ == "__main__":
    main()
