"""``tokenmill router``: one OpenAI endpoint in front of several ``tokenmill serve``
workers (``app``), choosing a worker per request with ``tokenmill.distributed.routing``
and watching the workers' health (``workers``)."""
