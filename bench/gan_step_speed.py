"""One GAN training step (a critic update and a generator update) in float32 against bfloat16 autocast, as
`python -m training gan --autocast` runs them: the resize network, the clipped WGAN's batch-norm critic, batch 64.

    python bench/gan_step_speed.py --threads 1 --repeats 20
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from training.models.gan import ConvCritic, ResizeGenerator
from training.train.run import training_autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per precision (after 3 untimed)")
    parser.add_argument("--width", type=int, default=32, help="the networks' width, as --width")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator, critic = ResizeGenerator(128, args.width), ConvCritic(args.width, depth=3, norm="batch")
    generator_optimizer = torch.optim.RMSprop(generator.parameters(), 5e-5)
    critic_optimizer = torch.optim.RMSprop(critic.parameters(), 5e-5)
    real, device = torch.randn(64, 1, 28, 28), torch.device("cpu")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    for setting in ("none", "bfloat16"):

        def step(setting: str = setting) -> None:
            with training_autocast(setting, device):
                fake = generator(torch.randn(64, 128))
                loss = critic(fake.detach()).float().mean() - critic(real).float().mean()
            critic_optimizer.zero_grad()
            loss.backward()
            critic_optimizer.step()
            with training_autocast(setting, device):
                generator_loss = -critic(fake).float().mean()
            generator_optimizer.zero_grad()
            generator_loss.backward()
            generator_optimizer.step()

        for _ in range(3):
            step()
        started = time.perf_counter()
        for _ in range(args.repeats):
            step()
        print(f"--autocast {setting}: {(time.perf_counter() - started) / args.repeats * 1000:.1f} ms a step")


if __name__ == "__main__":
    main()
