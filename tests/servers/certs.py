"""A throwaway certificate authority and a localhost server certificate for the test servers."""

from __future__ import annotations

import shutil
import ssl
import tempfile
from pathlib import Path

import trustme

SERVER_NAMES = ("localhost", "127.0.0.1")


class CA:
    """A trustme CA with one server certificate for localhost/127.0.0.1, written to PEM files."""

    def __init__(self, directory: Path | None = None) -> None:
        """Create the CA and the server certificate; write them to `directory` or a temp dir."""
        self._own_dir = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="mailbridge-ca.")) if directory is None else directory
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        # Dovecot's unprivileged processes may read these files: the dir must be traversable.
        self.directory.chmod(0o755)
        self.ca = trustme.CA(organization_name="mailbridge test CA")
        self.server_cert = self.ca.issue_cert(*SERVER_NAMES)
        self.ca_file = self.directory / "ca.pem"
        self.cert_file = self.directory / "server-cert.pem"
        self.key_file = self.directory / "server-key.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        # The chain file holds the leaf first, then any intermediates (trustme issues none).
        self.cert_file.write_bytes(
            b"".join(pem.bytes() for pem in self.server_cert.cert_chain_pems)
        )
        self.server_cert.private_key_pem.write_to_path(str(self.key_file))

    def server_ssl_context(self) -> ssl.SSLContext:
        """Return a server-side context presenting the localhost certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(context)
        return context

    def client_ssl_context(self) -> ssl.SSLContext:
        """Return a verifying client context that trusts only this CA (as the bridge's CA_FILE)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def cleanup(self) -> None:
        """Remove the PEM files if this object created their directory."""
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
