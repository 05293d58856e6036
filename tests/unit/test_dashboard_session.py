"""The dashboard's session cookies and CSRF tokens (smallfirst.api.dashboard.session)."""

from __future__ import annotations

from smallfirst.api.dashboard.session import Role, SessionSigner, key_fingerprint, login_token_ok

SECRET = b"s" * 32


def test_a_cookie_it_issued_reads_back_as_the_same_session() -> None:
    # given
    signer = SessionSigner(SECRET, ttl_s=60)
    session, cookie = signer.issue(Role.TENANT, "ten_1", "sf_live_key", now=1000.0)

    # when
    read = signer.read(cookie, now=1030.0)

    # then
    assert read == session
    assert read.key_fingerprint == key_fingerprint("sf_live_key")
    assert "sf_live_key" not in cookie


def test_an_expired_tampered_or_foreign_cookie_is_no_session() -> None:
    # given
    signer = SessionSigner(SECRET, ttl_s=60)
    _, cookie = signer.issue(Role.OPERATOR, None, "op", now=1000.0)
    body, _, signature = cookie.partition(".")

    # then
    assert signer.read(cookie, now=1061.0) is None
    assert signer.read(f"{body}A.{signature}", now=1001.0) is None
    assert SessionSigner(b"t" * 32, ttl_s=60).read(cookie, now=1001.0) is None
    assert signer.read("not-a-cookie", now=1001.0) is None
    assert signer.read(None) is None


def test_the_csrf_token_belongs_to_its_session() -> None:
    # given: two sessions of the same signer
    signer = SessionSigner(SECRET, ttl_s=60)
    first, _ = signer.issue(Role.TENANT, "ten_1", "k")
    second, _ = signer.issue(Role.TENANT, "ten_1", "k")

    # then
    assert signer.csrf_ok(first, signer.csrf_token(first))
    assert not signer.csrf_ok(first, signer.csrf_token(second))
    assert not signer.csrf_ok(first, None)


def test_the_login_token_must_match_its_cookie() -> None:
    assert login_token_ok("abc", "abc")
    assert not login_token_ok("abc", "abd")
    assert not login_token_ok(None, "abc")
    assert not login_token_ok("", "")
