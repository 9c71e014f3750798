"""The device side: one worker thread owns the device and runs what the scheduler decides.

- `messages.py`: the small typed classes between the HTTP side and the worker, one direction each;
- `scheduler.py`: which chains step next and the batching window of one-pass samplers (no torch);
- `worker.py`: the thread that owns the device and every model's weights and steps the pools;
- `buffer_keeper.py`: the worker's replay buffers (budget, start, saves, the figures /models shows);
- `pools/`: the pools the worker steps, one per kind of work.
"""
