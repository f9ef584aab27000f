"""Issue 24: the Location --http-redirect builds from a Host field (datapath/redirect.py), alone."""

from __future__ import annotations

import pytest

from corral.datapath.redirect import https_location

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("host", "port", "location"),
    [
        (b"example.org", 443, b"https://example.org/p?q=1"),
        (b"Example.ORG:80", 8443, b"https://example.org:8443/p?q=1"),
        (b"127.0.0.1:8080", 443, b"https://127.0.0.1/p?q=1"),
        (b"[::1]", 443, b"https://[::1]/p?q=1"),
        (b"[2001:db8::1]:80", 9443, b"https://[2001:db8::1]:9443/p?q=1"),
        (b"a-b.c1.example", 443, b"https://a-b.c1.example/p?q=1"),
    ],
)
def test_a_dns_name_or_an_address_is_redirected_to_the_tls_port(host, port, location):
    assert https_location(host, b"/p?q=1", port) == location


@pytest.mark.parametrize(
    "host",
    [
        b"",
        b"ex_ample.org",  # a reg-name RFC 3986 allows, but no DNS name
        b"-a.org",
        b"a-.org",
        b"a..org",
        b".a.org",
        b"a.org.",
        b"a.org:",
        b"a.org:0",
        b"a.org:65536",
        b"a.org:8o",
        b"a" * 64 + b".org",  # a label over 63 bytes
        b".".join([b"a" * 60] * 5),  # a name over 253 bytes
        b"[::1",
        b"[::1]x",
        b"[not-v6]",
        b"evil.org@good.org",
        b"%65vil.org",
        # An IPv6 zone id: ipaddress takes any text after the %, and a browser reads `[::%@evil.org?]` as
        # userinfo `[::%` and host evil.org (the edge's Host rule refuses @ and ?; this is the second line).
        b"[::%@evil.org?]",
        b"[::1%@evil.org#]:80",
        b"[fe80::1%eth0]",
        b"[fe80::1%25eth0]",
    ],
)
def test_a_host_that_is_no_dns_name_or_address_gets_no_redirect(host):
    assert https_location(host, b"/", 443) is None


def test_asterisk_form_has_nothing_to_redirect_to():
    assert https_location(b"example.org", b"*", 443) is None
