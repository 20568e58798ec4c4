"""A CA and a server certificate for 127.0.0.1 / localhost, made with the openssl CLI."""

import subprocess


def _openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def generate(directory):
    """Writes ca.crt, ca.key, server.crt, server.key into `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    p = {name: directory / name for name in ("ca.key", "ca.crt", "server.key", "server.csr",
                                              "server.crt", "server.ext")}
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(p["ca.key"]))
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(p["server.key"]))
    _openssl("req", "-x509", "-new", "-key", str(p["ca.key"]), "-out", str(p["ca.crt"]), "-days", "3",
             "-sha256", "-subj", "/CN=mqtt-connector soak CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash")
    p["server.ext"].write_text("basicConstraints=critical,CA:FALSE\n"
                               "keyUsage=critical,digitalSignature,keyEncipherment\n"
                               "extendedKeyUsage=serverAuth\n"
                               "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                               "authorityKeyIdentifier=keyid\n")
    _openssl("req", "-new", "-key", str(p["server.key"]), "-subj", "/CN=localhost", "-out", str(p["server.csr"]))
    _openssl("x509", "-req", "-in", str(p["server.csr"]), "-CA", str(p["ca.crt"]), "-CAkey", str(p["ca.key"]),
             "-CAcreateserial", "-days", "3", "-sha256", "-extfile", str(p["server.ext"]),
             "-out", str(p["server.crt"]))
    return p
