"""Where the editing token comes from, and what a bad one does: the file before $VISMEM_TOKEN, a
stripped value, and an empty or unreadable token refused at start with the source named (an
empty token would let anyone edit). Over HTTP in test_serve.py and test_serve_edits.py."""

from __future__ import annotations

import hashlib

import pytest

from index.serve.auth import TOKEN_ENV, token_digest


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_the_file_wins_over_the_environment_and_is_stripped(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    (tmp_path / "token").write_text("  from-file\n")
    assert token_digest(str(tmp_path / "token")) == digest("from-file")
    assert token_digest() == digest("from-env")
    monkeypatch.delenv(TOKEN_ENV)
    assert token_digest() is None                                   # no token anywhere: editing is off


@pytest.mark.parametrize("make, message", [
    (lambda p, mp: p.joinpath("token").write_text(" \n"), "the editing token in {p}/token is empty"),
    (lambda p, mp: mp.setenv(TOKEN_ENV, "   "), f"the editing token in ${TOKEN_ENV} is empty"),
    (lambda p, mp: None, "cannot read the token file {p}/token: No such file or directory"),
    (lambda p, mp: p.joinpath("token").mkdir(), "cannot read the token file {p}/token: Is a directory"),
])
def test_an_empty_or_unreadable_token_is_refused_naming_its_source(make, message, tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    make(tmp_path, monkeypatch)
    token_file = None if "$" in message else str(tmp_path / "token")
    with pytest.raises(ValueError) as error:
        token_digest(token_file)
    assert str(error.value) == message.format(p=tmp_path)


def test_vismem_serve_refuses_an_empty_token_file_before_starting_anything(tmp_path, capsys, monkeypatch):
    from cluster.cli import main
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    (tmp_path / "token").write_text("\n")
    assert main(["serve", "--memory", str(tmp_path / "no-memory"), "--token-file", str(tmp_path / "token")]) == 2
    assert f"the editing token in {tmp_path}/token is empty" in capsys.readouterr().err
