"""Self-signed TLS certificates for trying a Flower federation with TLS (not for production:
use your institution's CA there; docs/flower.md).

    python -m fedjax_seg.flower.certs --out certificates --host server.example.org [--host 10.0.0.5]

writes the four files of Flower's TLS guide: ``ca.crt`` + ``ca.key`` (a CA, 4096-bit RSA,
valid ``--days``), ``server.pem`` + ``server.key`` (the server's certificate signed by
that CA; subject alternative names ``localhost``, ``127.0.0.1``, ``::1`` and every
``--host``). The server gets ca.crt, server.pem and server.key; every hospital gets only
ca.crt (``--root_certificates``). Uses ``cryptography`` (a dependency of flwr).
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from typing import Dict, Sequence

FILES = ("ca.crt", "ca.key", "server.pem", "server.key")


def _names(hosts):
  from cryptography import x509
  out = []
  for h in ["localhost", "127.0.0.1", "::1", *hosts]:
    try:
      out.append(x509.IPAddress(ipaddress.ip_address(h)))
    except ValueError:
      out.append(x509.DNSName(h))
  return out


def generate(out_dir: str, hosts: Sequence[str] = (), days: int = 365,
             key_size: int = 4096) -> Dict[str, str]:
  """Writes ca.crt, ca.key, server.pem, server.key into ``out_dir``; returns their paths."""
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import rsa
  from cryptography.x509.oid import NameOID

  now = datetime.datetime.now(datetime.timezone.utc)
  valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
               not_valid_after=now + datetime.timedelta(days=days))
  ca_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
  ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedjax_seg federation CA")])
  ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256()))
  key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
  subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(hosts) or ["localhost"])[0])])
  cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
          .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
  os.makedirs(out_dir, exist_ok=True)
  pem = serialization.Encoding.PEM
  private = dict(encoding=pem, format=serialization.PrivateFormat.TraditionalOpenSSL,
                 encryption_algorithm=serialization.NoEncryption())
  blobs = {"ca.crt": ca.public_bytes(pem), "ca.key": ca_key.private_bytes(**private),
           "server.pem": cert.public_bytes(pem), "server.key": key.private_bytes(**private)}
  paths = {}
  for name in FILES:
    paths[name] = os.path.join(out_dir, name)
    fd = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                 0o600 if name.endswith(".key") else 0o644)
    with os.fdopen(fd, "wb") as f:
      f.write(blobs[name])
  return paths


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="certificates", help="output folder")
  ap.add_argument("--host", action="append", default=[],
                  help="a DNS name or IP address the hospitals use to reach the server "
                       "(repeatable; localhost, 127.0.0.1 and ::1 are always included)")
  ap.add_argument("--days", type=int, default=365)
  a = ap.parse_args(argv)
  paths = generate(a.out, a.host, a.days)
  print("\n".join(f"{n}: {p}" for n, p in paths.items()))


if __name__ == "__main__":
  main()
