"""Modules generated from protos/ at build time (setup.py runs grpcio-tools' protoc).

The generated `*_pb2.py` / `*_pb2.pyi` files are not committed: `pip install .` or
`pip install -e .` (`make venv`) writes them here. Import them only through the adapters
that own the API (`sidecar.context_api`, `sidecar.client`); nothing here is hand-written.
"""
