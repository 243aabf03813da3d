"""Signed patch files: keygen, sign, the signature trailer and the trust check of apply."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from helpers import make_patch
from patchbox import signing
from patchbox.cli.main import cli
from patchbox.errors import PatchFormatError
from patchbox.format.layout import (
    FLAG_SIGNED,
    HEADER,
    SIG_TRAILER,
    read_patch,
    save_patch,
    split_signature,
    write_patch,
)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner(mix_stderr=False).invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Two key pairs; only alice's public key is in the trust directory."""
    trust = tmp_path / "trusted"
    trust.mkdir()
    for name in ("alice", "mallory"):
        assert run("keygen", "--out", str(tmp_path / "keys" / name)).exit_code == 0
    (trust / "alice.pub").write_bytes((tmp_path / "keys" / "alice.pub").read_bytes())
    return {
        "trust": trust,
        "alice": tmp_path / "keys" / "alice.key",
        "mallory": tmp_path / "keys" / "mallory.key",
    }


@pytest.fixture
def patch_file(tmp_path: Path) -> Path:
    path = tmp_path / "answer.pbx"
    save_patch(make_patch(), path)
    return path


def key_id_of(key: Path) -> str:
    return signing.key_id(signing.load_private_key(key).public_key()).hex()


def apply_via_missing_socket(
    tmp_path: Path, patch_file: Path, *extra: str, env: dict[str, str] | None = None
) -> Result:
    """Runs apply against a socket that does not exist: passing the trust check shows as
    the connect error, failing it as the trust error (nothing is ever sent)."""
    return run("apply", "-s", str(tmp_path / "no-sock"), *extra, str(patch_file), env=env)


def test_keygen_files_and_modes(tmp_path: Path) -> None:
    result = run("keygen", "--out", str(tmp_path / "k" / "ops"))
    assert result.exit_code == 0, result.stderr
    key, pub = tmp_path / "k" / "ops.key", tmp_path / "k" / "ops.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    assert key_id_of(key) in result.stdout
    again = run("keygen", "--out", str(tmp_path / "k" / "ops"))
    assert again.exit_code == 1 and "not overwriting" in again.stderr


def test_sign_layout_and_roundtrip(keys: dict[str, Path], patch_file: Path) -> None:
    unsigned = patch_file.read_bytes()
    result = run("sign", "--key", str(keys["alice"]), str(patch_file))
    assert result.exit_code == 0, result.stderr
    data = patch_file.read_bytes()
    assert len(data) == len(unsigned) + SIG_TRAILER.size
    assert HEADER.unpack_from(data)[3] & FLAG_SIGNED
    assert data[len(unsigned) : len(unsigned) + 8] == b"PBXSIG01"
    sig = split_signature(data)
    assert sig is not None and sig.key_id.hex() == key_id_of(keys["alice"])
    assert read_patch(data) == read_patch(unsigned)
    # Re-signing replaces the signature instead of stacking trailers.
    assert run("sign", "--key", str(keys["mallory"]), str(patch_file)).exit_code == 0
    data2 = patch_file.read_bytes()
    sig = split_signature(data2)
    assert sig is not None
    assert len(data2) == len(data) and sig.key_id.hex() == key_id_of(keys["mallory"])


def test_no_trust_dir_accepts_unsigned(
    tmp_path: Path, patch_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(signing, "DEFAULT_TRUST_DIR", tmp_path / "absent")
    monkeypatch.delenv("PATCHBOX_TRUST_DIR", raising=False)
    result = apply_via_missing_socket(tmp_path, patch_file)
    assert result.exit_code == 1 and "no agent socket" in result.stderr


def test_named_trust_dir_must_exist(tmp_path: Path, patch_file: Path) -> None:
    result = apply_via_missing_socket(tmp_path, patch_file, "--trust-dir", str(tmp_path / "typo"))
    assert result.exit_code == 1
    assert "trust directory" in result.stderr and "typo" in result.stderr


def test_unsigned_refused_with_trust_dir(
    keys: dict[str, Path], tmp_path: Path, patch_file: Path
) -> None:
    result = apply_via_missing_socket(tmp_path, patch_file, "--trust-dir", str(keys["trust"]))
    assert result.exit_code == 1
    assert "is not signed" in result.stderr and str(keys["trust"]) in result.stderr
    assert "patchbox sign" in result.stderr


def test_env_trust_dir(keys: dict[str, Path], tmp_path: Path, patch_file: Path) -> None:
    result = apply_via_missing_socket(
        tmp_path, patch_file, env={"PATCHBOX_TRUST_DIR": str(keys["trust"])}
    )
    assert result.exit_code == 1 and "is not signed" in result.stderr


def test_trusted_signature_accepted(
    keys: dict[str, Path], tmp_path: Path, patch_file: Path
) -> None:
    run("sign", "--key", str(keys["alice"]), str(patch_file))
    result = apply_via_missing_socket(tmp_path, patch_file, "--trust-dir", str(keys["trust"]))
    assert result.exit_code == 1 and "no agent socket" in result.stderr, result.stderr


def test_untrusted_key_named(keys: dict[str, Path], tmp_path: Path, patch_file: Path) -> None:
    run("sign", "--key", str(keys["mallory"]), str(patch_file))
    result = apply_via_missing_socket(tmp_path, patch_file, "--trust-dir", str(keys["trust"]))
    assert result.exit_code == 1
    assert key_id_of(keys["mallory"]) in result.stderr and str(keys["trust"]) in result.stderr


def test_forged_signature_refused(keys: dict[str, Path], tmp_path: Path, patch_file: Path) -> None:
    run("sign", "--key", str(keys["alice"]), str(patch_file))
    data = bytearray(patch_file.read_bytes())
    data[-1] ^= 1  # last byte of the signature
    patch_file.write_bytes(bytes(data))
    result = apply_via_missing_socket(tmp_path, patch_file, "--trust-dir", str(keys["trust"]))
    assert result.exit_code == 1 and "does not verify" in result.stderr


def test_changed_header_after_signing_refused(
    keys: dict[str, Path], tmp_path: Path, patch_file: Path
) -> None:
    """The hash protects the payload; the signature also covers the header."""
    run("sign", "--key", str(keys["alice"]), str(patch_file))
    data = bytearray(patch_file.read_bytes())
    data[15] ^= 0x80  # flags bit 31: unknown flag
    patch_file.write_bytes(bytes(data))
    result = apply_via_missing_socket(tmp_path, patch_file, "--trust-dir", str(keys["trust"]))
    assert result.exit_code == 1 and "unknown header flags" in result.stderr


def test_stripped_signature_is_unsigned(
    keys: dict[str, Path], tmp_path: Path, patch_file: Path
) -> None:
    run("sign", "--key", str(keys["alice"]), str(patch_file))
    data = bytearray(patch_file.read_bytes()[: -SIG_TRAILER.size])
    data[12] &= ~FLAG_SIGNED
    patch_file.write_bytes(bytes(data))
    result = apply_via_missing_socket(tmp_path, patch_file, "--trust-dir", str(keys["trust"]))
    assert result.exit_code == 1 and "is not signed" in result.stderr


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d[:-1], "truncated or padded"),
        (lambda d: d + b"\0", "truncated or padded"),
        (
            lambda d: d[: -SIG_TRAILER.size] + b"XXXXXXXX" + d[-SIG_TRAILER.size + 8 :],
            "signature trailer",
        ),
        (lambda d: d[:-97] + b"\x07" + d[-96:], "unknown signature algorithm"),
    ],
)
def test_bad_trailer(
    keys: dict[str, Path], patch_file: Path, mutate: Callable[[bytes], bytes], match: str
) -> None:
    run("sign", "--key", str(keys["alice"]), str(patch_file))
    with pytest.raises(PatchFormatError, match=match):
        read_patch(mutate(patch_file.read_bytes()))


def test_bad_trusted_key_file_fails_closed(
    keys: dict[str, Path], tmp_path: Path, patch_file: Path
) -> None:
    run("sign", "--key", str(keys["alice"]), str(patch_file))
    (keys["trust"] / "broken.pub").write_text("not a key\n")
    result = apply_via_missing_socket(tmp_path, patch_file, "--trust-dir", str(keys["trust"]))
    assert result.exit_code == 1 and "broken.pub" in result.stderr


def test_sign_refuses_corrupt_file(keys: dict[str, Path], patch_file: Path) -> None:
    data = bytearray(patch_file.read_bytes())
    data[-2] ^= 0xFF
    patch_file.write_bytes(bytes(data))
    result = run("sign", "--key", str(keys["alice"]), str(patch_file))
    assert result.exit_code == 1 and "integrity hash mismatch" in result.stderr


def test_write_patch_is_unsigned() -> None:
    assert split_signature(write_patch(make_patch())) is None
