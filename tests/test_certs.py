"""`fedae certs`: a CA, the SuperLink's certificate and site keys in the formats Flower 1.42 loads."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedae.certs import (
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    SITE_IDS,
    load_private_key,
    make_certs,
    next_steps,
    parse_host,
    site_key_paths,
    superlink_file_warnings,
)
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
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != SITE_IDS}
    report = make_certs(folder, [], ["gamma"])  # no --host: the SuperLink certificate is kept as it is
    assert set(report.written) == {*site_key_paths(folder, "gamma"), folder / SITE_IDS}
    assert {p: p.read_bytes() for p in before} == before
    assert report.sites == ["alpha", "beta", "gamma"]
    again = make_certs(folder, ["fl.example.org"], ["alpha", "gamma"])  # a subset of the names: kept
    assert again.written == []


# -- site numbers (--id): a site's ledger is filed under its number, so it must never change ----------
def test_site_ids_are_fixed_in_order_of_arrival_and_never_renumbered(folder: Path) -> None:
    assert json.loads((folder / SITE_IDS).read_text()) == {"alpha": 0, "beta": 1}
    report = make_certs(folder, [], ["aardvark"])  # sorts first by name: must not shift the others
    assert report.site_ids == {"aardvark": 2, "alpha": 0, "beta": 1}
    assert "--name aardvark --id 2" in next_steps(report) and "--name alpha --id 0" in next_steps(report)
    for path in site_key_paths(folder, "alpha"):  # a site's keys removed: its number is not reused
        path.unlink()
    report = make_certs(folder, [], ["gamma"])
    assert report.site_ids == {"aardvark": 2, "beta": 1, "gamma": 3}
    make_certs(folder, [], ["beta"], force=True)  # a new key keeps the number
    assert json.loads((folder / SITE_IDS).read_text()) == {"alpha": 0, "beta": 1, "aardvark": 2, "gamma": 3}


def test_a_folder_from_before_sites_json_keeps_the_numbers_printed_then(folder: Path) -> None:
    # Before sites.json, `fedae certs` printed sites numbered in name order: those numbers are kept.
    (folder / SITE_IDS).unlink()
    make_certs(folder, [], ["zulu", "aardvark"])
    assert json.loads((folder / SITE_IDS).read_text()) == {"alpha": 0, "beta": 1, "zulu": 2, "aardvark": 3}


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "is not valid JSON"),
        ('{"alpha": -1}', "must map site names to non-negative integers"),
        ('{"alpha": 0, "beta": 0}', "gives two sites the same number"),
        ('["alpha"]', "must map site names to non-negative integers"),
    ],
)
def test_a_damaged_sites_json_is_refused_naming_it(folder: Path, content: str, needle: str) -> None:
    (folder / SITE_IDS).write_text(content)
    with pytest.raises(ConfigError, match=re.escape(f"{folder / SITE_IDS}")) as error:
        make_certs(folder, [], ["gamma"])
    assert needle in str(error.value)
    assert not site_key_paths(folder, "gamma")[0].exists()  # refused before writing


# -- the SuperLink's certificate: reissue and renewal -------------------------------------------------
def _reissued(folder: Path, before: bytes) -> bool:
    return (folder / SERVER_CERT).read_bytes() != before


def test_force_with_host_always_reissues_the_superlink_certificate(folder: Path) -> None:
    cert_before, key_before = (folder / SERVER_CERT).read_bytes(), (folder / SERVER_KEY).read_bytes()
    report = make_certs(folder, ["fl.example.org"], force=True)  # the certificate already names it
    assert set(report.written) == {folder / SERVER_CERT, folder / SERVER_KEY}
    assert _reissued(folder, cert_before) and (folder / SERVER_KEY).read_bytes() != key_before
    dns, ips = _sans(_cert(folder / SERVER_CERT))  # --force names exactly the hosts given
    assert dns == {"fl.example.org", "localhost"} and ips == {"127.0.0.1", "::1"}


@pytest.mark.parametrize(
    ("days_later", "reissued"),
    [(300, False), (340, True), (400, True)],  # 365-day certificate: kept, within 30 days, expired
)
def test_a_certificate_near_its_end_is_renewed_with_all_its_hosts(
    tmp_path: Path, days_later: int, reissued: bool
) -> None:
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    out = tmp_path / "certs"
    make_certs(out, ["fl.example.org", "10.1.2.3"], now=start)
    before = (out / SERVER_CERT).read_bytes()
    report = make_certs(out, ["fl.example.org"], now=start + dt.timedelta(days=days_later))
    assert _reissued(out, before) is reissued
    assert any("restart the SuperLink" in note for note in report.notes) is reissued
    assert _sans(_cert(out / SERVER_CERT)) == (
        {"fl.example.org", "localhost"},
        {"10.1.2.3", "127.0.0.1", "::1"},
    )
    if reissued:
        assert _cert(out / SERVER_CERT).not_valid_after_utc > start + dt.timedelta(days=days_later + 300)


def test_a_short_lived_certificate_is_renewed_in_its_second_half_not_on_every_run(tmp_path: Path) -> None:
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    out = tmp_path / "certs"
    make_certs(out, ["fl.example.org"], days=10, now=start)
    before = (out / SERVER_CERT).read_bytes()
    make_certs(out, ["fl.example.org"], now=start + dt.timedelta(days=1))
    assert not _reissued(out, before)
    make_certs(out, ["fl.example.org"], now=start + dt.timedelta(days=6))
    assert _reissued(out, before)


def test_a_superlink_key_that_does_not_match_is_reissued(folder: Path) -> None:
    other = make_certs(folder.parent / "other", ["fl.example.org"])
    (folder / SERVER_KEY).write_bytes((other.out_dir / SERVER_KEY).read_bytes())
    before = (folder / SERVER_CERT).read_bytes()
    make_certs(folder, ["fl.example.org"])
    assert _reissued(folder, before)
    key = load_private_key(folder / SERVER_KEY)
    assert key.public_key() == _cert(folder / SERVER_CERT).public_key()


def test_without_host_the_superlink_certificate_is_left_alone_even_when_absent(folder: Path) -> None:
    (folder / SERVER_CERT).unlink()
    (folder / SERVER_KEY).unlink()  # they live on the SuperLink host, not with the operator
    report = make_certs(folder, [], ["gamma"])
    assert set(report.written) == {*site_key_paths(folder, "gamma"), folder / SITE_IDS}
    assert not (folder / SERVER_CERT).exists() and not (folder / SERVER_KEY).exists()


def test_without_host_an_expiring_certificate_is_only_pointed_out(tmp_path: Path) -> None:
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    out = tmp_path / "certs"
    make_certs(out, ["fl.example.org"], now=start)
    before = (out / SERVER_CERT).read_bytes()
    report = make_certs(out, [], ["gamma"], now=start + dt.timedelta(days=350))
    assert not _reissued(out, before)
    assert any("expires on 2031-01-01" in note and "--host fl.example.org" in note for note in report.notes)
    assert "Note: " in next_steps(report)


def test_the_common_name_is_fixed_and_a_long_dns_name_fits(tmp_path: Path) -> None:
    long_name = f"{'a' * 60}.{'b' * 60}.example.org"  # a common name could hold only 64 characters
    make_certs(tmp_path / "certs", [long_name])
    cert = _cert(tmp_path / "certs" / SERVER_CERT)
    assert cert.subject.rfc4514_string() == "CN=fedae SuperLink"
    _verify(tmp_path / "certs", x509.DNSName(long_name))


# -- damaged files and interrupted runs ------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "hosts", "sites"),
    [
        (CA_KEY, [], ["gamma"]),
        (CA_CERT, [], ["gamma"]),
        (SERVER_CERT, ["fl.example.org"], []),
        (SERVER_KEY, ["fl.example.org"], []),
        ("sites/alpha.key", [], ["alpha"]),
    ],
)
def test_a_damaged_file_is_refused_naming_it(folder: Path, name: str, hosts: list, sites: list) -> None:
    (folder / name).write_text("-----BEGIN nonsense-----\n")
    with pytest.raises(ConfigError, match=re.escape(str(folder / name))):
        make_certs(folder, hosts, sites)


def test_a_stale_temporary_file_does_not_block_a_forced_reissue(folder: Path) -> None:
    # An interrupted `--force` used to leave .superlink.key.tmp behind, and every later run then failed.
    (folder / ".superlink.key.tmp").write_text("stale")
    (folder / ".superlink.key.x1y2z3.tmp").write_text("stale")
    before = (folder / SERVER_CERT).read_bytes()
    make_certs(folder, ["fl.example.org"], force=True)
    assert _reissued(folder, before)
    assert stat.S_IMODE((folder / SERVER_KEY).stat().st_mode) == 0o600


def test_a_failed_write_leaves_no_temporary_file(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p.name for p in folder.iterdir()}

    def broken_replace(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        make_certs(folder, ["fl.example.org"], force=True)
    assert {p.name for p in folder.iterdir()} == before


# -- what the SuperLink host should and should not hold --------------------------------------------
def test_next_steps_say_which_files_go_to_the_superlink_host(folder: Path) -> None:
    text = next_steps(make_certs(folder, [], []))
    assert "ONLY ca.crt, superlink.crt, superlink.key and sites/*.pub" in text
    assert "Keep ca.key and sites/*.key off that host" in text


def test_superlink_warns_about_private_keys_that_do_not_belong_there(folder: Path, tmp_path: Path) -> None:
    (warning,) = superlink_file_warnings(folder)
    assert str(folder / CA_KEY) in warning and str(site_key_paths(folder, "alpha")[0]) in warning
    offline = tmp_path / "offline"
    offline.mkdir()
    for path in [folder / CA_KEY, *(site_key_paths(folder, s)[0] for s in ("alpha", "beta"))]:
        path.rename(offline / path.name)
    assert superlink_file_warnings(folder) == []


def test_superlink_checks_expiry_and_the_key_pair(tmp_path: Path) -> None:
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    out = tmp_path / "certs"
    make_certs(out, ["fl.example.org"], now=start)
    (out / CA_KEY).unlink()
    assert superlink_file_warnings(out, now=start + dt.timedelta(days=300)) == []
    (warning,) = superlink_file_warnings(out, now=start + dt.timedelta(days=340))
    assert warning.startswith(f"{out / SERVER_CERT} expires on 2031-01-01")
    with pytest.raises(ConfigError, match="expired on 2031-01-01"):
        superlink_file_warnings(out, now=start + dt.timedelta(days=366))
    other = make_certs(tmp_path / "other", ["fl.example.org"])
    (out / SERVER_KEY).write_bytes((other.out_dir / SERVER_KEY).read_bytes())
    with pytest.raises(ConfigError, match=re.escape(f"{out / SERVER_KEY} is not the key of")):
        superlink_file_warnings(out, now=start)


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
        (["0.0.0.0"], [], 365, "--host 0.0.0.0 means 'every interface'"),
        (["[::]"], [], 365, "--host [::] means 'every interface'"),
        (["ok.example"], ["../escape"], 365, "site name must be letters"),
        (["ok.example"], [], 0, "--days must be from 1 to 3650, got 0"),
        (["ok.example"], [], 3651, "--days must be from 1 to 3650, got 3651"),
        ([], ["north"], 365, "--host is required on the first run"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path, hosts, sites, days, needle) -> None:
    out = tmp_path / "certs"
    with pytest.raises(ConfigError, match=re.escape(needle)):
        make_certs(out, hosts, sites, days=days)
    assert not out.exists()


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
