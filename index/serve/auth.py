"""Who may edit a served memory: the holder of its bearer token.

Queries need no token; every mutation (``/v1/memory/add``, ``/v1/memory/remove``) does. The token
comes from a file (``vismem serve --token-file``) or the ``VISMEM_TOKEN`` environment variable of
the process that starts the server; only its sha256 travels to the Router (a Serve deployment's
arguments are stored in the cluster's state), and a presented token is compared by digest in
constant time. A server started without a token refuses every mutation with 403.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from fastapi import HTTPException

TOKEN_ENV = "VISMEM_TOKEN"


def token_digest(token_file: str | None = None, env: str = TOKEN_ENV) -> str | None:
    """The sha256 of the editing token (from ``token_file``, else the environment variable ``env``,
    ``$VISMEM_TOKEN`` by default), or None where there is none. An empty token is an error: it
    would let anyone edit."""
    if token_file:
        try:
            with open(token_file) as f:
                token = f.read().strip()
        except OSError as e:
            raise ValueError(f"cannot read the token file {token_file}: {e.strerror}") from None
        source = token_file
    else:
        token, source = os.environ.get(env), f"${env}"
        if token is None:
            return None
        token = token.strip()
    if not token:
        raise ValueError(f"the editing token in {source} is empty")
    return hashlib.sha256(token.encode()).hexdigest()


def require_token(authorization: str | None, digest: str | None) -> None:
    """Raise the HTTP error for a mutation without the right ``Authorization: Bearer`` header."""
    if digest is None:
        raise HTTPException(403, "editing is off on this server: start `vismem serve` with --token-file or "
                                 f"{TOKEN_ENV} set to allow /v1/memory/add and /v1/memory/remove")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "this request edits the memory: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(hashlib.sha256(token.strip().encode()).hexdigest(), digest):
        raise HTTPException(401, "wrong editing token", headers={"WWW-Authenticate": "Bearer"})
