//! Throwaway certificates made with the `openssl` CLI: a CA, and server certificates for
//! 127.0.0.1 that it signs (each with its own serial and the common name asked for).

use super::tools;
use std::path::{Path, PathBuf};

pub struct Ca {
    dir: PathBuf,
    /// The CA certificate, to trust.
    pub pem: PathBuf,
}

impl Ca {
    /// A new CA in `dir` (`ca.pem`, `ca.key`); valid for two days.
    pub fn new(dir: &Path) -> Ca {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                "/CN=dockside e2e CA",
                "-days",
                "2",
            ],
        );
        Ca {
            dir: dir.to_path_buf(),
            pem: dir.join("ca.pem"),
        }
    }

    /// A fresh key and a certificate for IP 127.0.0.1 with common name `cn`, signed by this CA:
    /// `<name>.pem` and `<name>.key` in the CA's directory. Returns (cert, key).
    pub fn issue(&self, name: &str, cn: &str) -> (PathBuf, PathBuf) {
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        let subject = format!("/CN={cn}");
        openssl(
            &self.dir,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                &subject,
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-extfile",
                &format!("{name}.ext"),
                "-days",
                "2",
            ],
        );
        (self.dir.join(pem), self.dir.join(key))
    }
}

impl Ca {
    /// A directory holding only this CA, as `ca.crt`: what skopeo's `--src-cert-dir`, podman's
    /// `--cert-dir` and docker's `certs.d/<host>/` read as CAs to trust.
    pub fn cert_dir(&self) -> PathBuf {
        let dir = self.dir.join("trust");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&self.pem, dir.join("ca.crt")).unwrap();
        dir
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = tools::command("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
