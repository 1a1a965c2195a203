"""``fedae certs``: the federation's private CA, the SuperLink's TLS certificate, and site keys.

What Flower 1.42 expects, read from its source (``flwr/supernode/cli/flower_supernode.py``,
``flwr/cli/supernode/register.py``, ``flwr/supercore/primitives/asymmetric.py``):

- ``flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``: PEM files. Every address a
  SuperNode or ``flwr`` dials must be a subject alternative name of the SuperLink's certificate.
- ``flower-supernode --auth-supernode-private-key``: an **OpenSSH-format** private key, loaded with
  ``cryptography``'s ``load_ssh_private_key`` and refused unless it is an elliptic-curve key.
- ``flwr supernode register PUBLIC_KEY``: an **OpenSSH-format** public key line on a NIST curve. Flower
  generates P-384 (SECP384R1) keys itself, so fedae does too.

Layout of ``--out DIR`` (``fedae superlink --certs DIR`` reads the same names)::

    ca.crt  ca.key                 the federation's CA (ca.key never leaves the SuperLink operator)
    superlink.crt  superlink.key   the SuperLink's TLS certificate and key, signed by the CA
    sites/NAME.key  sites/NAME.pub the SuperNode authentication key pair of site NAME

The certificate always names the loopback too (``localhost``, ``127.0.0.1``, ``::1``): the SuperLink
starts its own ServerApp runtime (``flower-superexec``), which dials the SuperLink's API on the loopback
when it listens on 0.0.0.0, and verifies the certificate like any other client; ``fedae superlink``
registers site keys over the loopback as well. Naming the loopback lets no one else impersonate the
SuperLink: only the holder of ``superlink.key`` can present this certificate.

Private keys are created with mode 0600 from the start (never chmod-ed afterwards) and are never
overwritten unless ``force`` is given; the CA is reused when present and is never replaced.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.config import ConfigError

logger = logging.getLogger("fedae.certs")

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.crt", "superlink.key"
SITES_DIR = "sites"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1  # Flower's own choice for SuperNode keys (generate_key_pairs)
DEFAULT_DAYS = 365
CA_MIN_DAYS = 3650  # a new CA outlives the certificates it signs: re-issuing one must not mean a new CA
# Clocks across sites are not in step: a certificate valid from "now" would be "not yet valid" on a site
# whose clock runs a few minutes behind.
CLOCK_SKEW = dt.timedelta(hours=1)
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_-]{1,63})*$"
)


@dataclass
class CertsReport:
    """What one ``make_certs`` call wrote and what it found and kept."""

    out_dir: Path
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # the SuperLink certificate's names, loopback excluded
    sites: list[str] = field(default_factory=list)  # every site with a key pair in the folder


def site_key_paths(certs_dir: Path, site: str) -> tuple[Path, Path]:
    """The private and public key files of ``site`` in a certificates folder."""
    check_site_name(site)
    return certs_dir / SITES_DIR / f"{site}.key", certs_dir / SITES_DIR / f"{site}.pub"


def sites_in(certs_dir: Path) -> list[str]:
    """Names of the sites whose public key is in ``certs_dir`` (what the SuperLink registers)."""
    return sorted(p.stem for p in (certs_dir / SITES_DIR).glob("*.pub"))


def check_site_name(site: str) -> str:
    # The name becomes a file name and Flower's SuperNode name: no paths, spaces or quotes.
    if not _SITE_NAME.match(site):
        raise ConfigError(
            f"site name must be letters, digits, '.', '_' or '-' (at most 63, starting with a letter or "
            f"digit), got {site!r}"
        )
    return site


def parse_host(host: str) -> x509.GeneralName:
    """A ``--host`` as a subject alternative name: an IP address SAN, or else a DNS name SAN."""
    value = host.strip().strip("[]")  # "[::1]" as written in addresses
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _DNS_NAME.match(value) or value.replace(".", "").isdigit():
        raise ConfigError(f"--host must be a DNS name or an IP address, got {host!r}")
    return x509.DNSName(value.lower())


def san_names(cert: x509.Certificate) -> list[str]:
    """The certificate's DNS and IP subject alternative names, as text, in the certificate's order."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in sans if isinstance(n, x509.DNSName | x509.IPAddress)]


def _without_loopback(names: Sequence[str]) -> list[str]:
    return [n for n in names if n not in LOOPBACK_HOSTS]


def _name_text(name: x509.GeneralName) -> str:
    return str(name.value)


# -- writing ---------------------------------------------------------------------------------------
def _write_private(path: Path, data: bytes, replace: bool) -> None:
    """Write a private key readable by its owner only, created with mode 0600.

    ``O_EXCL`` refuses an existing file even if one appears between our check and the write. Replacing
    goes through a fresh 0600 file renamed over the old one, so no moment exists where the key is
    readable by others or half-written.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = path.with_name(f".{path.name}.tmp") if replace else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    if replace:
        os.replace(target, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ssh_private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The OpenSSH private key format ``flower-supernode --auth-supernode-private-key`` loads."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def ssh_public_line(key: ec.EllipticCurvePrivateKey, comment: str) -> bytes:
    """An OpenSSH public key line (``ecdsa-sha2-nistp384 AAAA... comment``): ``flwr supernode register``."""
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public + f" {comment}\n".encode()


# -- the CA ----------------------------------------------------------------------------------------
def _load_ca(out_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | None] | None:
    """The existing CA (its key may be absent: kept offline), or None when there is none."""
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    if not cert_path.exists():
        if key_path.exists():
            raise ConfigError(f"{key_path} exists without {cert_path}: restore {CA_CERT} or use a new --out")
        return None
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if not key_path.exists():
        return cert, None
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path} is not the key of {cert_path}; they must come from the same CA")
    return cert, key


def _new_ca(days: int, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedae federation CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=max(days, CA_MIN_DAYS)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


# -- the SuperLink's certificate -------------------------------------------------------------------
def _server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: list[x509.GeneralName],
    days: int,
    now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(CURVE())
    # A leaf must not outlive its CA: verifiers reject the chain once the CA has expired anyway.
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _name_text(names[0]))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _server_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in [*hosts, *LOOPBACK_HOSTS]:
        name = parse_host(host)
        if name not in names:
            names.append(name)
    return names


def _ensure_server_cert(
    report: CertsReport,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey | None],
    hosts: Sequence[str],
    days: int,
    force: bool,
    now: dt.datetime,
) -> None:
    out_dir = report.out_dir
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    ca_cert, ca_key = ca
    exists = cert_path.exists() or key_path.exists()
    if exists and not (cert_path.exists() and key_path.exists()):
        present, missing = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        if not force:
            raise ConfigError(f"{present} exists without {missing}; rerun with --force to issue a new pair")
    elif exists:
        current = x509.load_pem_x509_certificate(cert_path.read_bytes())
        reasons = []
        if not _issued_by(current, ca_cert):
            reasons.append(f"it was not issued by {out_dir / CA_CERT}")
        missing = {_name_text(n) for n in _server_names(hosts)} - set(san_names(current)) if hosts else set()
        if missing:
            reasons.append(f"it lacks host(s) {sorted(missing)}")
        if not reasons:
            report.kept += [cert_path, key_path]
            report.hosts = _without_loopback(san_names(current))
            return
        if not force:
            raise ConfigError(
                f"{cert_path} exists but {' and '.join(reasons)}; rerun with --force to replace it and "
                f"{key_path} (then restart the SuperLink)"
            )
    if not hosts:
        raise ConfigError("--host is required to issue the SuperLink's certificate (its address(es))")
    if ca_key is None:
        raise ConfigError(f"{out_dir / CA_KEY} is missing: the SuperLink's certificate cannot be signed")
    names = _server_names(hosts)
    cert, key = _server_cert(ca_cert, ca_key, names, days, now)
    _write_private(key_path, _pem_key(key), replace=key_path.exists())
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    report.written += [cert_path, key_path]
    report.hosts = _without_loopback([_name_text(n) for n in names])


# -- site keys -------------------------------------------------------------------------------------
def _ensure_site_key(report: CertsReport, site: str, force: bool) -> None:
    key_path, pub_path = site_key_paths(report.out_dir, site)
    if key_path.exists() and not force:
        key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path} is not an elliptic-curve key; rerun with --force to replace it")
        report.kept.append(key_path)
        line = ssh_public_line(key, f"fedae-site-{site}")
        if pub_path.exists() and pub_path.read_bytes().split()[:2] == line.split()[:2]:
            report.kept.append(pub_path)
        elif pub_path.exists():
            raise ConfigError(f"{pub_path} is not the public half of {key_path}; remove it or use --force")
        else:  # derivable from the private key: restoring it overwrites nothing
            _write_public(pub_path, line)
            report.written.append(pub_path)
        return
    if pub_path.exists() and not force:
        raise ConfigError(
            f"{pub_path} exists without its private key {key_path}; rerun with --force to make a new pair "
            "(the old public key stays registered on the SuperLink until you unregister it)"
        )
    key = ec.generate_private_key(CURVE())
    _write_private(key_path, ssh_private_bytes(key), replace=key_path.exists())
    _write_public(pub_path, ssh_public_line(key, f"fedae-site-{site}"))
    report.written += [key_path, pub_path]


def make_certs(
    out_dir: str | Path,
    hosts: Sequence[str] = (),
    sites: Sequence[str] = (),
    *,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    now: dt.datetime | None = None,
) -> CertsReport:
    """Create what is missing in ``out_dir``: the CA, the SuperLink's certificate, each site's key pair.

    ``hosts`` are the SuperLink's names and addresses as sites dial them. Existing files are reused;
    ``force`` replaces the SuperLink certificate (when ``hosts`` are given) and the named sites' keys,
    never the CA. Raises ``ConfigError`` naming the file or value in the way.
    """
    if days < 1:
        raise ConfigError(f"--days must be at least 1, got {days}")
    for site in sites:
        check_site_name(site)
    for host in hosts:
        parse_host(host)  # all bad input is refused before anything is written
    now = now or dt.datetime.now(dt.UTC)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out must be a folder, got the file {out}")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    report = CertsReport(out)
    ca = _load_ca(out)
    if ca is None:
        ca_cert, ca_key = _new_ca(days, now)
        _write_private(out / CA_KEY, _pem_key(ca_key), replace=False)
        _write_public(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
        report.written += [out / CA_CERT, out / CA_KEY]
        ca = (ca_cert, ca_key)
    else:
        report.kept += [out / CA_CERT] + ([out / CA_KEY] if ca[1] is not None else [])
    _ensure_server_cert(report, ca, hosts, days, force, now)
    for site in dict.fromkeys(sites):  # a site named twice is one site
        _ensure_site_key(report, site, force)
    report.sites = sites_in(out)
    for path in report.written:
        logger.debug("wrote %s", path)
    return report


def next_steps(report: CertsReport, port: int = 8000) -> str:
    """What to copy where and which commands to run next, for the CLI to print."""
    out = report.out_dir
    host = report.hosts[0] if report.hosts else "SUPERLINK_HOST"
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [
        "Next:",
        f"  1. On the SuperLink host (keep {out / CA_KEY} there, or offline):",
        f"       fedae superlink --certs {out} --address 0.0.0.0:{port}",
    ]
    if report.sites:
        lines.append(f"  2. Give each site {out / CA_CERT} and its own key (only its own), then at the site:")
        for number, site in enumerate(report.sites):
            key, _ = site_key_paths(out, site)
            lines.append(
                f"       fedae supernode --superlink {address} --ca ca.crt --key {key.name} "
                f"--name {site} --id {number} --data YOUR_DATA_FILE"
            )
        lines.append("     (--id: a unique integer per site; keep each site's number across runs)")
    else:
        lines.append(f"  2. Add sites with: fedae certs --out {out} --site NAME")
    lines.append(f"  3. Submit a run: fedae run --superlink {address} --ca {out / CA_CERT} --rounds N")
    return "\n".join(lines)
