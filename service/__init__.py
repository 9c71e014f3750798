"""The sample server: checkpoints in a directory -> one device worker -> REST.

A request flows one way through three wings, each importing only the wings below it
(tests/test_layout.py checks it):

- `http/`: the HTTP side (FastAPI app, request schemas, orders, the bridge to the worker, rendering,
  middleware); it does no device work and imports no pool;
- `engine/`: the device side (the typed messages between the two sides, the scheduler, the worker thread
  and, under `engine/pools/`, every pool that runs chains or batches on the device);
- `catalogue/`: the models that can be served (the registry loaded from the models directory, its live
  watching, the versions requests hold, the replay buffers saved on disk).

At the top: the entry points (`__main__.py`: `python -m service`; `ray_engine.py`: `--engine ray`), what
every wing shares (`settings.py`, `metrics.py`) and `client.py`, the alias of the client distribution.
"""
