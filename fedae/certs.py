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

    ca.crt  ca.key                 the federation's CA (ca.key never goes to the SuperLink host)
    superlink.crt  superlink.key   the SuperLink's TLS certificate and key, signed by the CA
    sites/NAME.key  sites/NAME.pub the SuperNode authentication key pair of site NAME
    sites.json                     each site's number (``--id``), fixed once given: never renumbered

The SuperLink host needs only ``ca.crt``, ``superlink.crt``, ``superlink.key`` and ``sites/*.pub``: it
runs whatever code a run submits (Flower's Control API has no authentication), so ``ca.key`` and the
sites' private keys must not be there.

The certificate always names the loopback too (``localhost``, ``127.0.0.1``, ``::1``): the SuperLink
starts its own ServerApp runtime (``flower-superexec``), which dials the SuperLink's API on the loopback
when it listens on 0.0.0.0, and verifies the certificate like any other client; ``fedae superlink``
registers site keys over the loopback as well. Naming the loopback lets no one else impersonate the
SuperLink: only the holder of ``superlink.key`` can present this certificate.

Every file is written to a fresh temporary file in its folder (private keys with mode 0600 from the
start, never chmod-ed afterwards) and renamed into place, so an interrupted run leaves no half-written
file. Keys are never overwritten unless ``force`` is given; the CA is reused when present and is never
replaced. Every refusal happens before anything is written.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.config import ConfigError

logger = logging.getLogger("fedae.certs")

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.crt", "superlink.key"
SITES_DIR = "sites"
SITE_IDS = "sites.json"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1  # Flower's own choice for SuperNode keys (generate_key_pairs)
# The subject names nothing: the SANs carry the hosts (a common name is limited to 64 characters).
SERVER_COMMON_NAME = "fedae SuperLink"
DEFAULT_DAYS = 365
MAX_DAYS = 3650
CA_DAYS = 3650  # a new CA outlives the certificates it signs: re-issuing one must not mean a new CA
RENEW_BEFORE = dt.timedelta(days=30)  # a SuperLink certificate this close to its end is renewed
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
    sites: list[str] = field(default_factory=list)  # every site with a public key in the folder
    site_ids: dict[str, int] = field(default_factory=dict)  # each of those sites' fixed number (--id)
    notes: list[str] = field(default_factory=list)  # why a certificate was reissued, or should be


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


def check_days(days: int) -> int:
    if not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"--days must be from 1 to {MAX_DAYS}, got {days}")
    return days


def parse_host(host: str) -> x509.GeneralName:
    """A ``--host`` as a subject alternative name: an IP address SAN, or else a DNS name SAN."""
    value = host.strip().strip("[]")  # "[::1]" as written in addresses
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        if address.is_unspecified:
            raise ConfigError(
                f"--host {host} means 'every interface' to a listening server; no site can dial it: give "
                "the SuperLink's name or IP address"
            )
        return x509.IPAddress(address)
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


# -- reading: a file that is not what it should be is the user's to fix (exit 2), never a traceback -----
def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from err


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as err:
        raise ConfigError(f"{path} is not a PEM certificate (damaged or another file?)") from err


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A PEM private key (``ca.key``, ``superlink.key``); it must be an unencrypted EC key."""
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"{path} is not an unencrypted PEM private key (damaged or another file?)") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an elliptic-curve key")
    return key


def load_site_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A site's OpenSSH private key, loaded the way ``flower-supernode`` loads it."""
    try:
        key = serialization.load_ssh_private_key(_read(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigError(
            f"{path} is not an unencrypted OpenSSH private key (damaged or another file?)"
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an elliptic-curve key (Flower accepts only those)")
    return key


def load_site_ids(certs_dir: Path) -> dict[str, int] | None:
    """``sites.json``: site name -> its number (``--id``), or None when the folder has none yet."""
    path = certs_dir / SITE_IDS
    if not path.exists():
        return None
    try:
        ids = json.loads(_read(path))
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(ids, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids.values()
    ):
        raise ConfigError(f"{path} must map site names to non-negative integers")
    for site in ids:
        check_site_name(site)
    if len(set(ids.values())) != len(ids):
        raise ConfigError(f"{path} gives two sites the same number; each site's number must be unique")
    return ids


def renewal_due(cert: x509.Certificate, now: dt.datetime) -> bool:
    """Whether a certificate has expired or ends within ``RENEW_BEFORE``.

    A certificate shorter-lived than twice that window is renewed in the second half of its life, so a
    short one is not reissued every time ``fedae certs`` runs.
    """
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return now >= cert.not_valid_after_utc - min(RENEW_BEFORE, lifetime / 2)


def _expiry(cert: x509.Certificate) -> str:
    return cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")


# -- writing ---------------------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, replace: bool = True) -> None:
    """Write ``path`` through a fresh temporary file in its folder, renamed into place.

    The temporary file is created with mode 0600 (``mkstemp``) and a unique name, so a stale one left
    by an interrupted run never blocks a later one; it is removed if anything fails. ``mode`` is set
    before the file gets its name. ``replace=False`` refuses an existing ``path`` even if it appears
    between our check and the write (a hard link fails where the name exists).
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            if mode != 0o600:
                os.fchmod(handle.fileno(), mode)
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
            os.unlink(temporary)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_private(path: Path, data: bytes, replace: bool) -> None:
    """A private key, readable by its owner only from the moment it has its name."""
    write_atomic(path, data, mode=0o600, replace=replace)


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
    cert = load_certificate(cert_path)
    if not key_path.exists():
        return cert, None
    key = load_private_key(key_path)
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path} is not the key of {cert_path}; they must come from the same CA")
    return cert, key


def _new_ca(now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedae federation CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
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
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_COMMON_NAME)]))
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


def _server_decision(
    out_dir: Path, ca_cert: x509.Certificate, hosts: Sequence[str], force: bool, now: dt.datetime
) -> tuple[list[str], str] | None:
    """Whether to issue the SuperLink's certificate for ``hosts``: ``(hosts to name, why)``, or None to
    keep the current one. Raises ``ConfigError`` where only ``--force`` may replace it."""
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    if force:
        return list(hosts), "--force"
    if not cert_path.exists() and not key_path.exists():
        return list(hosts), "new"
    if not (cert_path.exists() and key_path.exists()):
        present, missing = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        raise ConfigError(f"{present} exists without {missing}; rerun with --force to issue a new pair")
    hint = f"rerun with --force to replace it and {key_path} (then restart the SuperLink)"
    current = load_certificate(cert_path)
    if not _issued_by(current, ca_cert):
        raise ConfigError(f"{cert_path} exists but it was not issued by {out_dir / CA_CERT}; {hint}")
    current_names = san_names(current)
    missing_hosts = sorted({_name_text(n) for n in _server_names(hosts)} - set(current_names))
    if missing_hosts:
        raise ConfigError(f"{cert_path} exists but it lacks host(s) {missing_hosts}; {hint}")
    # Renewing keeps every name the certificate had: a site may dial any of them.
    renewed_hosts = list(dict.fromkeys([*hosts, *_without_loopback(current_names)]))
    try:
        key = load_private_key(key_path)
    except ConfigError as err:
        raise ConfigError(f"{err}; {hint}") from err
    if key.public_key() != current.public_key():
        return renewed_hosts, f"{key_path} was not the key of {cert_path}"
    if now >= current.not_valid_after_utc:
        return renewed_hosts, f"{cert_path} expired on {_expiry(current)}"
    if renewal_due(current, now):
        return renewed_hosts, f"{cert_path} was to expire on {_expiry(current)}"
    return None


def _write_server_cert(
    report: CertsReport,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    hosts: Sequence[str],
    reason: str,
    days: int,
    now: dt.datetime,
) -> None:
    out = report.out_dir
    names = _server_names(hosts)
    cert, key = _server_cert(*ca, names, days, now)
    _write_private(out / SERVER_KEY, _pem_key(key), replace=True)
    write_atomic(out / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
    report.written += [out / SERVER_CERT, out / SERVER_KEY]
    report.hosts = _without_loopback([_name_text(n) for n in names])
    if reason != "new":
        report.notes.append(f"reissued {out / SERVER_CERT} ({reason}): restart the SuperLink with it")


def _current_server_hosts(report: CertsReport, now: dt.datetime) -> None:
    """Left alone (no ``--host``): what the SuperLink's certificate names, and whether it needs renewing."""
    cert_path = report.out_dir / SERVER_CERT
    if not cert_path.exists():
        return
    try:
        current = load_certificate(cert_path)
    except ConfigError as err:
        report.notes.append(f"{err}: reissue it with --host NAME --force")
        return
    report.hosts = _without_loopback(san_names(current))
    if renewal_due(current, now):
        hosts = " ".join(f"--host {h}" for h in report.hosts) or "--host NAME"
        report.notes.append(
            f"{cert_path} expires on {_expiry(current)}: renew it with `fedae certs --out {report.out_dir} "
            f"{hosts}`, then restart the SuperLink"
        )


# -- site keys and numbers -------------------------------------------------------------------------
def _site_decision(out_dir: Path, site: str, force: bool) -> tuple[str, bytes | None]:
    """``("new", None)``, ``("keep", None)`` or ``("restore", public line)``; raises ``ConfigError``."""
    key_path, pub_path = site_key_paths(out_dir, site)
    if force:
        return "new", None
    if key_path.exists():
        try:
            key = load_site_key(key_path)
        except ConfigError as err:
            raise ConfigError(f"{err}; rerun with --force --site {site} to make a new pair") from err
        line = ssh_public_line(key, f"fedae-site-{site}")
        if not pub_path.exists():  # derivable from the private key: restoring it overwrites nothing
            return "restore", line
        if _read(pub_path).split()[:2] != line.split()[:2]:
            raise ConfigError(f"{pub_path} is not the public half of {key_path}; remove it or use --force")
        return "keep", None
    if pub_path.exists():
        raise ConfigError(
            f"{pub_path} exists without its private key {key_path}; rerun with --force to make a new pair "
            "(the old public key stays registered on the SuperLink until you unregister it)"
        )
    return "new", None


def _write_site_keys(report: CertsReport, site: str, action: str, public_line: bytes | None) -> None:
    key_path, pub_path = site_key_paths(report.out_dir, site)
    if action == "keep":
        report.kept += [key_path, pub_path]
    elif action == "restore" and public_line is not None:
        write_atomic(pub_path, public_line)
        report.kept.append(key_path)
        report.written.append(pub_path)
    else:
        replaced = pub_path.exists()
        key = ec.generate_private_key(CURVE())
        _write_private(key_path, ssh_private_bytes(key), replace=key_path.exists())
        write_atomic(pub_path, ssh_public_line(key, f"fedae-site-{site}"))
        report.written += [key_path, pub_path]
        if replaced:
            report.notes.append(
                f"new key for site {site}: its old public key stays registered on the SuperLink until you "
                "unregister it (docs/DEPLOYMENT.md, 'Rotating and revoking keys')"
            )


def assign_site_ids(
    recorded: dict[str, int] | None, present: Sequence[str], added: Sequence[str]
) -> dict[str, int]:
    """Every site's number: the recorded ones unchanged, each site new to the record gets the next one.

    ``present``: sites whose key files were there before this run; ``added``: sites named now, in
    order. A folder made before ``sites.json`` existed gets the numbers fedae printed then (sites in
    name order, from 0). Numbers are never reused, even for a site whose keys are gone.
    """
    ids = dict(recorded or {})
    if recorded is None:
        ids = {site: number for number, site in enumerate(sorted(present))}
    for site in [*sorted(present), *added]:
        if site not in ids:
            ids[site] = max(ids.values(), default=-1) + 1
    return ids


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

    ``hosts`` are the SuperLink's names and addresses as sites dial them; without them an existing
    federation's SuperLink certificate is left alone (its files need not even be here). With them the
    certificate is issued if missing, and reissued (naming its old hosts too) when it has expired,
    expires within ``RENEW_BEFORE``, or its key does not match it. ``force`` always reissues it for
    exactly ``hosts``, and makes new keys for the named ``sites`` (same numbers); never a new CA.
    Raises ``ConfigError`` naming the file or value in the way, before anything is written.
    """
    check_days(days)
    sites = list(dict.fromkeys(check_site_name(site) for site in sites))  # a site named twice is one
    for host in hosts:
        parse_host(host)  # all bad input is refused before anything is written
    if force and not hosts and not sites:
        raise ConfigError("--force replaces the SuperLink certificate (give --host) or site keys (--site)")
    now = now or dt.datetime.now(dt.UTC)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out must be a folder, got the file {out}")
    ca = _load_ca(out) if out.is_dir() else None
    if ca is None and not hosts:
        raise ConfigError(
            f"--host is required on the first run (no CA in {out} yet): the name or IP address sites "
            "dial to reach the SuperLink"
        )
    if ca is None:
        server_files = [p for p in (out / SERVER_CERT, out / SERVER_KEY) if p.exists()]
        if server_files and not force:
            raise ConfigError(
                f"{server_files[0]} exists but {out / CA_CERT} does not: restore it, or rerun with --force "
                "to make a new CA and reissue the SuperLink's certificate"
            )
        server: tuple[list[str], str] | None = (list(hosts), "new")
    else:
        server = _server_decision(out, ca[0], hosts, force, now) if hosts else None
        if server is not None and ca[1] is None:
            raise ConfigError(f"{out / CA_KEY} is missing: the SuperLink's certificate cannot be signed")
    decisions = {site: _site_decision(out, site, force) for site in sites}
    present = sites_in(out) if out.is_dir() else []
    recorded = load_site_ids(out) if out.is_dir() else None
    ids = assign_site_ids(recorded, present, sites)

    # Nothing was refused: write.
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    report = CertsReport(out)
    if ca is None:
        ca_cert, ca_key = _new_ca(now)
        _write_private(out / CA_KEY, _pem_key(ca_key), replace=False)
        write_atomic(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
        report.written += [out / CA_CERT, out / CA_KEY]
    else:
        ca_cert, ca_key = ca
        report.kept += [out / CA_CERT] + ([out / CA_KEY] if ca_key is not None else [])
    if server is None and hosts:
        report.kept += [out / SERVER_CERT, out / SERVER_KEY]
    if server is None:
        _current_server_hosts(report, now)
    elif ca_key is not None:  # checked above: a certificate to issue has the CA's key
        _write_server_cert(report, (ca_cert, ca_key), *server, days, now)
    for site, (action, line) in decisions.items():
        _write_site_keys(report, site, action, line)
    if ids != recorded and ids:
        ordered = dict(sorted(ids.items(), key=lambda item: item[1]))
        write_atomic(out / SITE_IDS, (json.dumps(ordered, indent=2) + "\n").encode())
        report.written.append(out / SITE_IDS)
    report.sites = sites_in(out)
    report.site_ids = {site: ids[site] for site in report.sites}
    for path in report.written:
        logger.debug("wrote %s", path)
    return report


def superlink_file_warnings(certs_dir: Path, now: dt.datetime | None = None) -> list[str]:
    """Check the files ``fedae superlink`` serves; returns warnings, raises ``ConfigError`` on a file
    that cannot work (unreadable, a key that is not the certificate's, another CA, expired)."""
    now = now or dt.datetime.now(dt.UTC)
    ca_path, cert_path, key_path = certs_dir / CA_CERT, certs_dir / SERVER_CERT, certs_dir / SERVER_KEY
    ca_cert, cert, key = load_certificate(ca_path), load_certificate(cert_path), load_private_key(key_path)
    renew = f"`fedae certs --out DIR --host NAME` where {CA_KEY} is"
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path} is not the key of {cert_path}; reissue both with {renew}")
    if not _issued_by(cert, ca_cert):
        raise ConfigError(
            f"{cert_path} was not issued by {ca_path}; use the pair from the same `fedae certs`"
        )
    if now >= cert.not_valid_after_utc:
        raise ConfigError(f"{cert_path} expired on {_expiry(cert)}; renew it with {renew}")
    warnings = []
    for path, current in ((cert_path, cert), (ca_path, ca_cert)):
        if now >= current.not_valid_after_utc - RENEW_BEFORE:
            warnings.append(f"{path} expires on {_expiry(current)}; renew it with {renew}")
    stray = [certs_dir / CA_KEY, *sorted((certs_dir / SITES_DIR).glob("*.key"))]
    if found := [str(path) for path in stray if path.exists()]:
        warnings.append(
            f"private keys that do not belong on the SuperLink host are in {certs_dir}: {', '.join(found)}; "
            "the SuperLink runs the code any run submits (Flower's Control API has no authentication): "
            f"keep only {CA_CERT}, {SERVER_CERT}, {SERVER_KEY} and {SITES_DIR}/*.pub here"
        )
    return warnings


def next_steps(report: CertsReport, port: int = 8000) -> str:
    """What to copy where and which commands to run next, for the CLI to print."""
    out = report.out_dir
    host = report.hosts[0] if report.hosts else "SUPERLINK_HOST"
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"Note: {note}" for note in report.notes]
    lines += ["", "Next:"] if lines else ["Next:"]
    lines += [
        f"  1. Copy to the SuperLink host ONLY {CA_CERT}, {SERVER_CERT}, {SERVER_KEY} and {SITES_DIR}/*.pub",
        f"     (into a folder laid out like {out}); there, run:",
        f"       fedae superlink --certs DIR --address 0.0.0.0:{port}",
        f"     Keep {CA_KEY} and {SITES_DIR}/*.key off that host: the SuperLink runs the code any run",
        "     submits (Flower's Control API has no authentication).",
    ]
    if report.sites:
        lines.append(f"  2. Give each site {out / CA_CERT} and its own key (only its own), then at the site:")
        for site in sorted(report.sites, key=lambda name: report.site_ids[name]):
            key, _ = site_key_paths(out, site)
            lines.append(
                f"       fedae supernode --superlink {address} --ca ca.crt --key {key.name} "
                f"--name {site} --id {report.site_ids[site]} --data YOUR_DATA_FILE"
            )
        lines.append(
            f"     (--id is fixed per site in {out / SITE_IDS}: the site's privacy ledger is filed under it)"
        )
    else:
        lines.append(f"  2. Add sites with: fedae certs --out {out} --site NAME")
    lines.append(f"  3. Submit a run: fedae run --superlink {address} --ca {out / CA_CERT} --rounds N")
    return "\n".join(lines)
