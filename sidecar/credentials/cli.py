"""`mandate jwks`: the public keys upstreams verify Transaction Tokens with, and new keys.

    mandate jwks --keys DIR                     print the JWKS of the signing-key directory
    mandate jwks --keys DIR --listen HOST:PORT  serve it at /.well-known/jwks.json
    mandate jwks --new-key DIR/KID.pem [--alg ES256]
                                                write a new private key (0600) for DIR

The server answers GET /.well-known/jwks.json (and /jwks.json) with the public keys only,
re-reading the directory as the sidecar does (a Secret update is picked up without a
restart), `Cache-Control: max-age=60`. `mandate run --admin` serves the same document when
it is given `--txn-token-keys` (:func:`add_jwks_route`). Never a private key.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from aiohttp import web

from sidecar.credentials.keys import SigningKeys, generate_key, load_key_set
from sidecar.errors import ConfigError

__all__ = ["JWKS_PATH", "add_jwks_route", "run_jwks"]

JWKS_PATH = "/.well-known/jwks.json"
_MAX_AGE = "public, max-age=60"


def add_jwks_route(app: web.Application, keys: SigningKeys) -> None:
    """GET /.well-known/jwks.json and /jwks.json: the public keys of ``keys``."""

    async def jwks(_: web.Request) -> web.Response:
        keys.refresh()
        return web.Response(
            body=keys.jwks_json(),
            content_type="application/json",
            headers={"Cache-Control": _MAX_AGE},
        )

    app.router.add_get(JWKS_PATH, jwks)
    app.router.add_get("/jwks.json", jwks)


def run_jwks(args: argparse.Namespace) -> int:
    try:
        if args.new_key is not None:
            path = generate_key(args.new_key, args.alg)
            print(f"wrote {path} (kid {path.stem}, {args.alg}); name it in signing-kid to sign")
            return 0
        if args.keys is None:
            raise ConfigError("--keys DIR (or --new-key DIR/KID.pem) is needed")
        load_key_set(args.keys)  # refuse a broken directory at once, naming the file
        keys = SigningKeys(args.keys)
        if args.listen is None:
            sys.stdout.write(keys.jwks_json().decode() + "\n")
            return 0
        host, _, port = args.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--listen {args.listen!r}: expected HOST:PORT")
        asyncio.run(_serve(keys, host.strip("[]"), int(port)))
        return 0
    except (ConfigError, FileExistsError, ValueError) as exc:
        print(f"mandate jwks: {exc}", file=sys.stderr)
        return 2


async def _serve(keys: SigningKeys, host: str, port: int) -> None:
    app = web.Application()
    add_jwks_route(app, keys)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"serving the JWKS of {keys} on http://{host}:{port}{JWKS_PATH}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
