"""``pixelrnn-jax serve``: a web page and JSON API over one or more loaded models.

- :mod:`.models`: loading models by source and answering one 28x28 image
  (standard library, NumPy and JAX only: testable without the web extra);
- :mod:`.app`: the FastAPI application (``make_app``), its input checks and
  error replies;
- :mod:`.server`: binding the socket and running uvicorn until Ctrl-C;
- ``static/``: the page (plain HTML, JavaScript and CSS, no build step).

The web pieces need the ``serve`` extra: ``pip install -e '.[serve]'``.
"""
