"""`fedae certs`: a CA, the SuperLink's certificate and site keys in the formats Flower 1.42 loads."""

from __future__ import annotations

import ipaddress
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedae.certs import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, make_certs, parse_host, site_key_paths
from shared.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        set(sans.get_values_for_type(x509.DNSName)),
        {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)},
    )


def _verify(folder: Path, name: x509.GeneralName) -> None:
    """Verify the SuperLink's certificate as a TLS client would: chain to the CA, name, server use."""
    verifier = PolicyBuilder().store(Store([_cert(folder / CA_CERT)])).build_server_verifier(name)
    verifier.verify(_cert(folder / SERVER_CERT), [])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    make_certs(out, ["fl.example.org", "10.1.2.3", "2001:db8::7"], ["alpha", "beta"])
    return out


def test_names_are_dns_and_ip_sans_with_the_loopback(folder: Path) -> None:
    dns, ips = _sans(_cert(folder / SERVER_CERT))
    assert dns == {"fl.example.org", "localhost"}
    assert ips == {"10.1.2.3", "2001:db8::7", "127.0.0.1", "::1"}


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("fl.example.org"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
        x509.IPAddress(ipaddress.ip_address("2001:db8::7")),
        x509.DNSName("localhost"),  # the SuperLink's own runtime dials the loopback
    ],
)
def test_server_certificate_verifies_against_the_ca_for_each_name(
    folder: Path, name: x509.GeneralName
) -> None:
    _verify(folder, name)


def test_server_certificate_does_not_verify_for_another_name_or_ca(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(VerificationError):
        _verify(folder, x509.DNSName("other.example.org"))
    other = tmp_path / "other"
    make_certs(other, ["fl.example.org"])
    verifier = (
        PolicyBuilder()
        .store(Store([_cert(other / CA_CERT)]))
        .build_server_verifier(x509.DNSName("localhost"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(_cert(folder / SERVER_CERT), [])


def test_private_keys_are_mode_0600(folder: Path) -> None:
    private = [
        folder / CA_KEY,
        folder / SERVER_KEY,
        *(site_key_paths(folder, s)[0] for s in ("alpha", "beta")),
    ]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_site_key_loads_the_way_flower_loads_it(folder: Path) -> None:
    # Flower's own parsing of --auth-supernode-private-key (flower-supernode) and of the public key that
    # `flwr supernode register` sends: if either changes format, this fails.
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, uses_nist_ec_curve
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    key_path, pub_path = site_key_paths(folder, "alpha")
    args = type("Args", (), {"auth_supernode_private_key": str(key_path), "auth_supernode_public_key": None})
    private, public = _try_setup_client_authentication(args)  # type: ignore[arg-type]
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    registered = bytes_to_public_key(try_load_public_key(pub_path))
    assert uses_nist_ec_curve(registered)
    assert registered.public_numbers() == public.public_numbers()


def test_rerun_reuses_the_ca_and_adds_a_site_without_touching_existing_files(folder: Path) -> None:
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    report = make_certs(folder, [], ["gamma"])  # no --host: the SuperLink certificate is kept as it is
    assert set(report.written) == set(site_key_paths(folder, "gamma"))
    assert {p: p.read_bytes() for p in before} == before
    assert report.sites == ["alpha", "beta", "gamma"]
    again = make_certs(folder, ["fl.example.org"], ["alpha", "gamma"])  # a subset of the names: kept
    assert again.written == []


def test_new_hosts_are_refused_without_force_then_reissued_by_the_same_ca(folder: Path) -> None:
    ca_before = (folder / CA_CERT).read_bytes()
    alpha_before = site_key_paths(folder, "alpha")[0].read_bytes()
    with pytest.raises(ConfigError, match=r"lacks host\(s\) \['new.example.org'\].*--force"):
        make_certs(folder, ["new.example.org"])
    report = make_certs(folder, ["new.example.org"], force=True)
    assert set(report.written) == {folder / SERVER_CERT, folder / SERVER_KEY}
    assert (folder / CA_CERT).read_bytes() == ca_before
    assert site_key_paths(folder, "alpha")[0].read_bytes() == alpha_before
    _verify(folder, x509.DNSName("new.example.org"))
    assert stat.S_IMODE((folder / SERVER_KEY).stat().st_mode) == 0o600


def test_force_replaces_a_site_key_keeping_mode_0600(folder: Path) -> None:
    key_path, pub_path = site_key_paths(folder, "alpha")
    old_key, old_pub = key_path.read_bytes(), pub_path.read_bytes()
    assert make_certs(folder, [], ["alpha"]).written == []  # listed again: kept, never regenerated
    make_certs(folder, [], ["alpha"], force=True)
    assert key_path.read_bytes() != old_key and pub_path.read_bytes() != old_pub
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_a_public_key_without_its_private_key_is_refused(folder: Path) -> None:
    key_path, pub_path = site_key_paths(folder, "beta")
    key_path.unlink()
    with pytest.raises(ConfigError, match=re.escape("beta.pub exists without its private key")):
        make_certs(folder, [], ["beta"])
    pub_path.unlink()
    assert set(make_certs(folder, [], ["beta"]).written) == {key_path, pub_path}


def test_a_lost_public_key_is_restored_from_the_private_key(folder: Path) -> None:
    key_path, pub_path = site_key_paths(folder, "beta")
    line = pub_path.read_bytes()
    pub_path.unlink()
    report = make_certs(folder, [], ["beta"])
    assert report.written == [pub_path] and key_path in report.kept
    assert pub_path.read_bytes() == line


@pytest.mark.parametrize(
    ("hosts", "sites", "days", "needle"),
    [
        (["bad host"], [], 365, "--host must be a DNS name or an IP address, got 'bad host'"),
        (["999.1.1.1"], [], 365, "--host must be a DNS name or an IP address"),
        (["ok.example"], ["../escape"], 365, "site name must be letters"),
        (["ok.example"], [], 0, "--days must be at least 1, got 0"),
        ([], [], 365, "--host is required"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path, hosts, sites, days, needle) -> None:
    out = tmp_path / "certs"
    with pytest.raises(ConfigError, match=re.escape(needle)):
        make_certs(out, hosts, sites, days=days)
    assert not (out / SERVER_KEY).exists()


def test_parse_host_keeps_ipv6_in_brackets() -> None:
    assert parse_host("[::1]") == x509.IPAddress(ipaddress.ip_address("::1"))
    assert parse_host("FL.Example.org") == x509.DNSName("fl.example.org")


def test_cli_prints_what_it_wrote_and_exits_2_on_refusal(tmp_path: Path) -> None:
    out = tmp_path / "certs"

    def fedae(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "fedae", "certs", "--out", str(out), *args]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    first = fedae("--host", "127.0.0.1", "--site", "s0")
    assert first.returncode == 0, first.stderr
    assert f"written: {out / 'sites' / 's0.key'}" in first.stdout
    assert "fedae superlink --certs" in first.stdout and "fedae supernode" in first.stdout
    refused = fedae("--host", "other.example.org")
    assert refused.returncode == 2
    assert refused.stderr.startswith("fedae: error: ") and "--force" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
