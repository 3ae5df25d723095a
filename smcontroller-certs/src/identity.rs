//! What a certificate says about its subject: the names a client certificate binds a node to
//! (R-TLS-4), and when a certificate expires.

use std::time::{Duration, SystemTime};

use x509_parser::{
    certificate::X509Certificate, error::X509Error, extensions::GeneralName, prelude::FromDer as _,
    time::ASN1Time,
};

use crate::Error;

/// The names a certificate gives its subject: the subject's common name (CN) and the DNS names
/// of its subject alternative names (SANs).
///
/// The server binds an SM's `node_id` to its client certificate with these (contract R-TLS-4):
/// see [`PeerIdentity::matches`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerIdentity {
    common_name: Option<String>,
    dns_names: Vec<String>,
}

/// Which names of a client certificate a `node_id` may match (contract R-TLS-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdentityField {
    /// The subject's common name only.
    CommonName,
    /// The DNS names of the subject alternative names only.
    DnsSan,
    /// The common name or any DNS SAN.
    #[default]
    Any,
}

impl PeerIdentity {
    /// The names in the DER-encoded certificate `der`.
    ///
    /// The common name is the subject's first CN attribute, if it is a text string; the DNS
    /// names are every `dNSName` of the subject alternative names, in order.
    pub fn from_der(der: &[u8]) -> Result<Self, X509Error> {
        let cert = parse(der)?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let dns_names = match cert.subject_alternative_name()? {
            Some(san) => san
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    _ => None,
                })
                .collect(),
            None => Vec::new(),
        };
        Ok(Self {
            common_name,
            dns_names,
        })
    }

    /// A made-up identity (for tests of code that checks identities).
    pub fn new(common_name: Option<String>, dns_names: Vec<String>) -> Self {
        Self {
            common_name,
            dns_names,
        }
    }

    /// The subject's common name, if it has one.
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }

    /// The DNS names among the subject alternative names.
    pub fn dns_names(&self) -> &[String] {
        &self.dns_names
    }

    /// Whether `node_id` is exactly (byte for byte, case included) one of the names `field`
    /// selects.
    pub fn matches(&self, node_id: &str, field: IdentityField) -> bool {
        let by_cn = || self.common_name.as_deref() == Some(node_id);
        let by_dns = || self.dns_names.iter().any(|name| name == node_id);
        match field {
            IdentityField::CommonName => by_cn(),
            IdentityField::DnsSan => by_dns(),
            IdentityField::Any => by_cn() || by_dns(),
        }
    }
}

/// When the certificate `der` (from `url`) expires: as a time, and as written in it.
pub(crate) fn not_after(der: &[u8], url: &str) -> Result<(SystemTime, String), Error> {
    let cert = parse(der).map_err(|source| Error::BadCertificate {
        url: url.to_owned(),
        source,
    })?;
    let not_after = cert.validity().not_after;
    Ok((system_time(not_after), not_after.to_string()))
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, X509Error> {
    match X509Certificate::from_der(der) {
        Ok((_rest, cert)) => Ok(cert),
        Err(x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e)) => Err(e),
        Err(x509_parser::nom::Err::Incomplete(_)) => Err(X509Error::InvalidCertificate),
    }
}

fn system_time(time: ASN1Time) -> SystemTime {
    let secs = time.timestamp();
    match u64::try_from(secs) {
        Ok(after) => SystemTime::UNIX_EPOCH + Duration::from_secs(after),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_id_matches_the_selected_names_exactly() {
        let id = PeerIdentity::new(
            Some("node-1".into()),
            vec!["node-1.aos".into(), "n1".into()],
        );
        assert!(id.matches("node-1", IdentityField::CommonName));
        assert!(!id.matches("n1", IdentityField::CommonName));
        assert!(id.matches("n1", IdentityField::DnsSan));
        assert!(!id.matches("node-1", IdentityField::DnsSan));
        assert!(id.matches("node-1", IdentityField::Any));
        assert!(id.matches("node-1.aos", IdentityField::Any));
        assert!(!id.matches("Node-1", IdentityField::Any));
        assert!(!PeerIdentity::default().matches("", IdentityField::Any));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(PeerIdentity::from_der(b"not a certificate").is_err());
        assert!(matches!(
            not_after(b"\x30\x03\x02\x01", "file:///x.pem"),
            Err(Error::BadCertificate { url, .. }) if url == "file:///x.pem"
        ));
    }
}
