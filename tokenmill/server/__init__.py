"""The OpenAI-compatible HTTP server (``tokenmill serve``).

``tokenmill.server.app.build_app(async_engine, model_names)`` returns the FastAPI app;
``tokenmill.server.cli_serve`` parses the command line and runs it under uvicorn. Nothing
is imported here, so ``tokenmill --help`` stays fast.
"""
