"""The pools the worker steps: each holds the work of one model (or buffer group) and runs it on the device.

- `base.py`: what every pool shares (per-job state, one failure path, one way to hand out a result);
- `chain.py`: what every pool of chains shares (one batched step, requests joining and leaving between steps);
- `langevin.py`: image chains under an energy (an EBM or an ensemble: one buffer group);
- `latent.py`: a GAN's latent chains (DDLS);
- `ode.py`: a CNF's chains, one ODE solver step at a time;
- `generator.py`: one-pass samplers (GAN generators, exact-inverse flows), batched within a window;
- `score.py`: POST /score's pools (one-pass scores and a CNF's likelihood solve);
- `pool_set.py`: `PoolSet`, the pools across model versions (current ones and replaced ones still finishing).
"""
