"""Reading OMNI_*_TOKEN(_FILE), and which Authorization headers open which routes."""

from __future__ import annotations

from pathlib import Path

import pytest

from omni_runtime.cli import main
from omni_runtime.config import ConfigError
from omni_runtime.server.tokens import Access, Tokens, authorized


def test_tokens_from_variables_and_files(tmp_path: Path) -> None:
    assert Tokens.from_environ({}) == Tokens(None, None)
    assert Tokens.from_environ({"OMNI_API_TOKEN": ""}) == Tokens(None, None)  # empty: unset
    token_file = tmp_path / "admin"
    token_file.write_text("s3cret-admin\n")
    tokens = Tokens.from_environ(
        {"OMNI_API_TOKEN": "s3cret-api", "OMNI_ADMIN_TOKEN_FILE": str(token_file)}
    )
    assert tokens == Tokens(api="s3cret-api", admin="s3cret-admin")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OMNI_API_TOKEN_FILE": "/no/such/file"}, "cannot read the token file /no/such/file"),
        ({"OMNI_API_TOKEN": "a", "OMNI_API_TOKEN_FILE": "/x"}, "both set; set one of them"),
        ({"OMNI_ADMIN_TOKEN": "two words"}, "OMNI_ADMIN_TOKEN: the token must be printable"),
        ({"OMNI_API_TOKEN": "caf\u00e9"}, "printable ASCII"),
    ],
)
def test_bad_tokens_name_the_variable_or_file(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Tokens.from_environ(environ)


def test_an_empty_token_file_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=rf"OMNI_API_TOKEN_FILE \({empty}\): .* is empty"):
        Tokens.from_environ({"OMNI_API_TOKEN_FILE": str(empty)})


def test_serve_stops_with_status_2_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OMNI_API_TOKEN_FILE", str(tmp_path / "missing"))
    assert main(["serve", str(tmp_path), "--port", "0"]) == 2
    assert f"OMNI_API_TOKEN_FILE: cannot read the token file {tmp_path / 'missing'}" in (
        capsys.readouterr().err
    )


def _headers(value: str | None) -> list[tuple[bytes, bytes]]:
    headers = [(b"host", b"omni")]
    if value is not None:
        headers.append((b"authorization", value.encode()))
    return headers


def test_the_admin_token_opens_api_routes_but_not_the_reverse() -> None:
    tokens = Tokens(api="api", admin="admin")
    api, admin = tokens.accepted(Access.API), tokens.accepted(Access.ADMIN)
    assert tokens.accepted(Access.OPEN) == ()
    assert authorized(_headers("Bearer api"), api)
    assert authorized(_headers("Bearer admin"), api)
    assert authorized(_headers("bearer admin"), admin)
    assert authorized(_headers("BEARER admin"), admin)
    assert not authorized(_headers("Bearer api"), admin)
    for wrong in (None, "Bearer", "Bearer ", "Bearer apx", "Basic api", "api", "Bearer api "):
        assert not authorized(_headers(wrong), api), wrong


def test_unset_tokens_leave_routes_open() -> None:
    assert Tokens().accepted(Access.API) == Tokens().accepted(Access.ADMIN) == ()
    only_admin = Tokens(admin="admin")
    assert only_admin.accepted(Access.API) == ()  # inference open, repository guarded
    assert only_admin.accepted(Access.ADMIN) == (b"Bearer admin",)
    only_api = Tokens(api="api")  # then the API token guards the repository too
    assert only_api.accepted(Access.ADMIN) == (b"Bearer api",)
