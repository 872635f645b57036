//! TLS for the namespace connection: the public web roots Azure's
//! certificates chain to, plus the certificates of an extra CA file
//! (`RTPD_SERVICEBUS_CA_FILE`) for a TLS-inspecting proxy or a test broker.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

pub(super) fn client_config(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let what = || format!("RTPD_SERVICEBUS_CA_FILE {}", path.display());
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", what()))? {
            let cert = cert.map_err(|e| format!("{}: {e}", what()))?;
            roots.add(cert).map_err(|e| format!("{}: {e}", what()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("{}: no PEM certificate in the file", what()));
        }
    }
    Ok(Arc::new(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}
