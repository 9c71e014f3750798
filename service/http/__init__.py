"""The HTTP side: HTTP -> schema -> order -> (the engine) -> render -> HTTP. No device work and no pool here.

- `app.py`: `create_app(settings)`, the routes and the lifespan (load models, start and stop the worker);
- `schemas.py`: request and response bodies and their limits;
- `orders.py`: request -> `SampleOrder` (which fields apply to the model, limits, the checkpoint's defaults);
- `score_route.py`: POST /score, request -> `ScoreOrder` -> response;
- `bridge.py`: submit an order to the worker, wait for its answer or stream its frames (with `memory.py`,
  which gives the memory of dropped frames back to the operating system);
- `render.py`: worker results -> PNG, GIF, JSON and SSE bodies;
- `model_info.py`: a served model as GET /models describes it;
- `middleware.py`: guards that act before a request is parsed (idle connections, API key, slow bodies);
- `static/`: the demo page.
"""
