"""Standard Webhooks signing and verification, and the callback URL policy."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress

import pytest

from smallfirst.common.webhooks import (
    CallbackUrlRefused,
    WebhookVerificationError,
    check_callback_url,
    embedded_ipv4,
    generate_secret,
    sign,
    signature_headers,
    verify,
    verify_headers,
)

# The example of the Standard Webhooks specification (standard-webhooks/standard-webhooks, spec).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = '{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_specifications_example() -> None:
    # when
    signature = sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)

    # then
    assert signature == SPEC_SIGNATURE


def test_signature_is_hmac_sha256_over_id_timestamp_and_body() -> None:
    # given
    secret = generate_secret()
    key = base64.b64decode(secret.removeprefix("whsec_"))

    # when
    signature = sign(secret, "msg_1", 1700000000, b'{"a":1}')

    # then
    expected = hmac.new(key, b'msg_1.1700000000.{"a":1}', hashlib.sha256).digest()
    assert signature == "v1," + base64.b64encode(expected).decode()


def test_verify_accepts_a_fresh_signed_message() -> None:
    # given
    secret = generate_secret()
    headers = signature_headers(secret, "msg_2", b'{"status":"succeeded"}', timestamp=1_700_000_000)

    # when / then: no exception
    verify_headers(secret, headers, b'{"status":"succeeded"}', now=1_700_000_030)


def test_verify_rejects_a_changed_body_a_wrong_secret_and_a_stale_timestamp() -> None:
    # given
    secret = generate_secret()
    signature = sign(secret, "msg_3", 1_700_000_000, b"body")

    # when / then
    with pytest.raises(WebhookVerificationError, match="matches"):
        verify(secret, "msg_3", 1_700_000_000, b"body!", signature, now=1_700_000_000)
    with pytest.raises(WebhookVerificationError, match="matches"):
        verify(generate_secret(), "msg_3", 1_700_000_000, b"body", signature, now=1_700_000_000)
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(secret, "msg_3", 1_700_000_000, b"body", signature, now=1_700_000_000 + 301)
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(secret, "msg_3", 1_700_000_000, b"body", signature, now=1_700_000_000 - 301)


def test_any_of_several_signatures_may_match_during_a_secret_rotation() -> None:
    # given: signed with the old and the new secret
    old, new = generate_secret(), generate_secret()
    headers = signature_headers([old, new], "msg_4", b"{}", timestamp=1_700_000_000)

    # when / then: a receiver holding either secret accepts it
    assert len(headers["webhook-signature"].split()) == 2
    verify_headers(old, headers, b"{}", now=1_700_000_000)
    verify_headers(new, headers, b"{}", now=1_700_000_000)


def test_missing_header_is_reported_by_name() -> None:
    with pytest.raises(WebhookVerificationError, match="webhook-signature"):
        verify_headers(generate_secret(), {"webhook-id": "m", "webhook-timestamp": "1"}, b"")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook",
    "http://10.0.0.8/hook",
    "http://192.168.1.20:8080/hook",
    "http://172.16.5.4/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://100.64.0.1/hook",
    "http://0.0.0.0/hook",
    "http://[::1]/hook",
    "http://[fd00::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
])
def test_private_loopback_and_link_local_targets_are_refused(url: str) -> None:
    with pytest.raises(CallbackUrlRefused, match="non-public"):
        check_callback_url(url, allow_private=False)


def test_hostnames_are_resolved_and_judged_by_their_addresses() -> None:
    # given: a name that resolves to a private address (DNS rebinding, internal names)
    def resolver(host: str, port: int) -> list[str]:
        return {"hooks.example.com": ["93.184.216.34"], "internal.example.com": ["93.184.216.34", "10.0.0.5"]}[host]

    # when
    addresses = check_callback_url("https://hooks.example.com/cb", allow_private=False, resolver=resolver)

    # then
    assert addresses == ["93.184.216.34"]
    with pytest.raises(CallbackUrlRefused, match=r"10\.0\.0\.5"):
        check_callback_url("https://internal.example.com/cb", allow_private=False, resolver=resolver)


def test_unresolvable_host_is_refused() -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(CallbackUrlRefused, match="does not resolve"):
        check_callback_url("https://nowhere.invalid/cb", allow_private=False, resolver=resolver)


@pytest.mark.parametrize("url", ["ftp://93.184.216.34/x", "93.184.216.34/x", "http:///x",
                                 "https://user:pw@93.184.216.34/x", "http://93.184.216.34:99999/x"])
def test_malformed_urls_are_refused_even_when_private_targets_are_allowed(url: str) -> None:
    with pytest.raises(CallbackUrlRefused):
        check_callback_url(url, allow_private=True)


def test_operator_may_allow_private_targets() -> None:
    # when / then: no exception, nothing resolved
    assert check_callback_url("http://127.0.0.1:9000/hook", allow_private=True) == []


def test_public_address_literal_is_accepted_without_dns() -> None:
    assert check_callback_url("https://93.184.216.34/hook", allow_private=False) == ["93.184.216.34"]


# Each IPv6 form that embeds an IPv4 address, hiding a private one (refused) or a public one (kept).
# 10.0.0.1 is 0a00:0001 in hex, 127.0.0.1 is 7f00:0001, 169.254.169.254 is a9fe:a9fe.
EMBEDDING_FORMS = {
    "nat64_well_known": ("64:ff9b::a00:1", "64:ff9b::5db8:d822"),
    "nat64_local_use": ("64:ff9b:1::a00:1", "64:ff9b:1::5db8:d822"),
    "ipv4_compatible": ("::10.0.0.1", "::93.184.216.34"),
    "ipv4_mapped": ("::ffff:a9fe:a9fe", "::ffff:93.184.216.34"),
    "sixtofour": ("2002:7f00:1::1", "2002:5db8:d822::1"),
    # Teredo: server 65.54.227.120, client 10.0.0.1 stored inverted (0a00:0001 -> f5ff:fffe).
    "teredo": ("2001:0:4136:e378:8000:63bf:f5ff:fffe", None),
}


@pytest.mark.parametrize("form", sorted(EMBEDDING_FORMS))
def test_ipv6_forms_that_embed_a_private_ipv4_address_are_refused(form: str) -> None:
    # given: a callback host written as that IPv6 form of a private address
    private, _ = EMBEDDING_FORMS[form]

    # when / then
    with pytest.raises(CallbackUrlRefused, match="non-public"):
        check_callback_url(f"http://[{private}]/hook", allow_private=False)


@pytest.mark.parametrize("form", sorted(name for name, (_, public) in EMBEDDING_FORMS.items() if public))
def test_ipv6_forms_that_embed_a_public_ipv4_address_are_kept(form: str) -> None:
    # given: the same form around a public address (93.184.216.34 is 5db8:d822)
    _, public = EMBEDDING_FORMS[form]
    assert public is not None

    # when
    addresses = check_callback_url(f"http://[{public}]/hook", allow_private=False)

    # then
    assert addresses == [str(ipaddress.ip_address(public))]


@pytest.mark.parametrize("form", sorted(EMBEDDING_FORMS))
def test_a_hostname_resolving_to_an_embedding_form_of_a_private_address_is_refused(form: str) -> None:
    # given: DNS (AAAA) that answers with the IPv6 form, as a NAT64 resolver (DNS64) would
    private, _ = EMBEDDING_FORMS[form]

    def resolver(host: str, port: int) -> list[str]:
        return [private]

    # when / then
    with pytest.raises(CallbackUrlRefused, match="non-public"):
        check_callback_url("https://hooks.example.com/cb", allow_private=False, resolver=resolver)


def test_embedded_ipv4_is_extracted_from_each_form() -> None:
    # when
    found = {form: [str(a) for a in embedded_ipv4(ipaddress.IPv6Address(private))]
             for form, (private, _) in EMBEDDING_FORMS.items()}

    # then
    assert found == {
        "nat64_well_known": ["10.0.0.1"],
        "nat64_local_use": ["10.0.0.1"],
        "ipv4_compatible": ["10.0.0.1"],
        "ipv4_mapped": ["169.254.169.254"],
        "sixtofour": ["127.0.0.1"],
        "teredo": ["65.54.227.120", "10.0.0.1"],
    }
