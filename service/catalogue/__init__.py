"""The models that can be served: what the models directory holds, as the server loaded it.

- `registry.py`: checkpoints -> `Registry`, the served models (`ServedModel`), ensembles and buffer groups;
- `model_watch.py`: the live models directory (`ModelWatcher` polls it, `ModelRepository` loads what changed
  and makes a new `Registry`);
- `served_models.py`: `ServedModels`, the registry requests are served from now and the versions they hold;
- `buffer_store.py`: replay buffers saved to and restored from the state directory.

One name per concept: a `Registry` is one snapshot of the served models; the worker publishes the current
one in `ServedModels`; `ModelRepository` makes the next one from the directory; the engine's `PoolSet` holds
the pools built for them.
"""
