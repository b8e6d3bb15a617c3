"""The commands that need no API: ``zmta config check`` and ``zmta dkim keygen``."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from zmta_common.config import ConfigError, load_config
from zmta_common.domains import canonical_domain

from .app import JsonOption, typer_app
from .errors import CliError, InvalidInput
from .output import emit_json, say

config = typer_app("The configuration file, checked offline.")
dkim = typer_app("DKIM keys for dkim.key_dir, and their DNS records.")

TXT_STRING = 255  # octets in one character-string of a TXT record (RFC 1035)
RSA_BITS = (1024, 4096)  # what the sender accepts
RSA_DEFAULT_BITS = 2048
_LABELS = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


# -- config check --------------------------------------------------------------------------


@config.command("check")
def check(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="the YAML config file", show_default=False)],
    json_out: JsonOption = False,
) -> None:
    """Check a config file offline.

    FILE is loaded with the services' own loader; every error is printed with the path of
    its key, and the exit code is 1. ZMTA_<SECTION>__<KEY> variables in the environment
    override the file, as they do for the services."""
    errors = config_errors(file)
    if json_out:
        emit_json({"file": str(file), "valid": not errors, "errors": [{"key": k, "message": m} for k, m in errors]})
    elif not errors:
        say(f"{file}: ok")
    for key, message in [] if json_out else errors:
        typer.echo(f"{file}: {key}: {message}" if key else f"{file}: {message}", err=True)
    if errors:
        raise CliError(f"{file}: {len(errors)} {'error' if len(errors) == 1 else 'errors'}")


def config_errors(file: Path) -> list[tuple[str | None, str]]:
    """Each error as (key path, what is wrong with it); the key is None for the file as a whole."""
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [(None, "no such file")]
    except (OSError, UnicodeDecodeError) as exc:
        return [(None, f"cannot be read: {exc}")]
    except yaml.YAMLError as exc:
        return [(None, _yaml_error(exc))]
    if data is not None and not isinstance(data, dict):
        return [(None, f"the top level must be a mapping of keys, not a {type(data).__name__}")]
    try:
        load_config(file)
    except ConfigError as exc:
        return _described(str(exc))
    return []


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return "not valid YAML: " + " ".join(str(exc).split())
    return f"not valid YAML: line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _described(text: str) -> list[tuple[str | None, str]]:
    """The lines of a ConfigError: ``invalid configuration:`` then ``  key: message (got ...)``."""
    head, _, rest = text.partition("\n")
    if head.strip() != "invalid configuration:":
        return [(None, text)]
    errors: list[tuple[str | None, str]] = []
    for line in rest.splitlines():
        key, _, message = line.strip().partition(": ")
        errors.append((None if key == "(top level)" else key, message))
    return errors


# -- dkim keygen ---------------------------------------------------------------------------


@dkim.command("keygen")
def keygen(
    domain: Annotated[str, typer.Argument(metavar="DOMAIN", help="the signing domain (d=)", show_default=False)],
    selector: Annotated[str, typer.Argument(metavar="SELECTOR", help="the selector (s=)", show_default=False)],
    use_ed25519: Annotated[bool, typer.Option("--ed25519", help="an Ed25519 key instead of RSA")] = False,
    bits: Annotated[
        int | None,
        typer.Option(
            min=RSA_BITS[0], max=RSA_BITS[1], help=f"RSA key size [default: {RSA_DEFAULT_BITS}]", show_default=False
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="directory to write the key to: the config's dkim.key_dir [default: .]")
    ] = None,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="write to the dkim.key_dir of this config file instead of --out")
    ] = None,
    force: Annotated[bool, typer.Option(help="replace a key file that exists")] = False,
    json_out: JsonOption = False,
) -> None:
    """Make a DKIM key and its DNS record.

    The private key goes to <out>/<domain>.<selector>.pem, the name the senders look for in
    dkim.key_dir; the TXT record to publish at <selector>._domainkey.<domain> is printed, in
    strings of at most 255 octets."""
    if use_ed25519 and bits is not None:
        raise typer.BadParameter("it is for RSA keys; an Ed25519 key has one size", param_hint="--bits")
    if out is not None and config_file is not None:
        raise typer.BadParameter("give --out or --config, not both", param_hint="--config")
    name, label = _domain(domain), _selector(selector)
    folder = _key_dir(config_file) if config_file is not None else (out or Path("."))
    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if use_ed25519:
        private, algorithm, kind = ed25519.Ed25519PrivateKey.generate(), "ed25519", "Ed25519"
    else:
        size = bits or RSA_DEFAULT_BITS
        private, algorithm, kind = rsa.generate_private_key(65537, size), f"rsa{size}", f"RSA {size} bits"
    key_file = folder / f"{name}.{label}.pem"
    _write_key(key_file, private, force)
    record = public_record(private)
    strings = split_txt(record)
    owner = f"{label}._domainkey.{name}."
    if json_out:
        emit_json(
            {
                "domain": name,
                "selector": label,
                "algorithm": algorithm,
                "key_file": str(key_file),
                "name": owner,
                "record": record,
                "strings": strings,
            }
        )
        return
    say(f"private key ({kind}): {key_file}")
    say(f"publish at {owner}")
    say(zone_file_line(owner, strings))


def _domain(value: str) -> str:
    name = canonical_domain(value)
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABELS.match(label) for label in labels):
        raise InvalidInput(f"DKIM domain {value!r} is not a domain name")
    return name


def _selector(value: str) -> str:
    label = value.strip().lower()
    if "." in label:
        # dkim.key_dir names files <domain>.<selector>.pem: the selector is what follows the last dot.
        raise InvalidInput(f"selector {value!r}: a selector in dkim.key_dir is one label, without dots")
    if not _LABELS.match(label):
        raise InvalidInput(f"selector {value!r} is not a DNS label (letters, digits, - and _)")
    return label


def _key_dir(config_file: Path) -> Path:
    try:
        key_dir = load_config(config_file).dkim.key_dir
    except ConfigError as exc:
        raise InvalidInput(f"{config_file}: {exc}") from None
    if not key_dir:
        raise InvalidInput(f"{config_file}: dkim.key_dir is not set")
    return Path(key_dir)


def _write_key(path: Path, private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey, force: bool) -> None:
    """The key as PKCS#8 PEM, readable by its owner only; an existing file only with ``force``."""
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise InvalidInput(f"{path} exists: a new key would replace it (--force to do so)") from None
    except OSError as exc:
        raise InvalidInput(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.chmod(path, 0o600)


def public_record(private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> str:
    """The TXT record's text: ``v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>`` (RFC 6376)
    or ``k=ed25519; p=<base64 raw public key>`` (RFC 8463)."""
    public: Any = private.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        kind, raw = "ed25519", public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        kind = "rsa"
        raw = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k={kind}; p={base64.b64encode(raw).decode('ascii')}"


def split_txt(record: str) -> list[str]:
    """The record in character-strings of at most 255 octets (it is ASCII: one octet a character)."""
    return [record[i : i + TXT_STRING] for i in range(0, len(record), TXT_STRING)]


def zone_file_line(owner: str, strings: list[str]) -> str:
    """The record as a zone file writes it, one string a line (nothing in a DKIM record needs escaping)."""
    if len(strings) == 1:
        return f'{owner} IN TXT "{strings[0]}"'
    quoted = "\n\t".join(f'"{s}"' for s in strings)
    return f"{owner} IN TXT (\n\t{quoted} )"
