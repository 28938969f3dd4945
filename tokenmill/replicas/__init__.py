"""Data parallelism: N engine replicas behind one front end, each in its own process (or
Ray actor), with a cache-aware router choosing the replica for each request.

- ``worker``: what runs inside a replica (an ``AsyncEngine`` driven by messages);
- ``transport``: the replica handles the front end holds (a spawned process talking over
  a ``multiprocessing`` pipe; ``ray_actor`` for Ray);
- ``dp_engine``: ``DataParallelEngine``, shaped like ``AsyncEngine`` so the HTTP layer
  serves it unchanged.
"""
