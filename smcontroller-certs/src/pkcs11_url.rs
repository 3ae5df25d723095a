//! `pkcs11:` URLs (RFC 7512): which token, which object, which module, which PIN.
//!
//! The parser is compiled in every build, so that a build without the `pkcs11` feature can still
//! say what is wrong with such a URL; loading from a token needs the feature.

use std::{borrow::Cow, fmt, path::PathBuf};

use crate::{Error, loader};

/// What the text of a PIN is replaced with wherever a `pkcs11:` URL is shown.
pub(crate) const MASKED_PIN: &str = "***";

/// The kind of object a `pkcs11:` URL names (its `type` attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectType {
    /// `type=private`: a private key.
    Private,
    /// `type=public`: a public key.
    Public,
    /// `type=cert`: a certificate.
    Cert,
    /// `type=secret-key`: a secret (symmetric) key.
    SecretKey,
    /// `type=data`: a data object.
    Data,
}

impl ObjectType {
    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "private" => Self::Private,
            "public" => Self::Public,
            "cert" => Self::Cert,
            "secret-key" => Self::SecretKey,
            "data" => Self::Data,
            _ => return None,
        })
    }

    /// The attribute's value as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::Public => "public",
            Self::Cert => "cert",
            Self::SecretKey => "secret-key",
            Self::Data => "data",
        }
    }
}

/// Where the PIN of a token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum PinSource {
    /// `pin-value=...`: the PIN itself. Its [`Debug`](fmt::Debug) shows `***`.
    Value(String),
    /// `pin-source=...`: the file holding the PIN (its first line is the PIN).
    File(PathBuf),
}

impl fmt::Debug for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(_) => f.write_str("Value(***)"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// A parsed `pkcs11:` URL (RFC 7512), as the certificate storage hands them out, e.g.
/// `pkcs11:token=aos;object=sm;id=%01?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234`.
///
/// Path attributes understood: `token` (the token's label), `manufacturer`, `model`, `serial`
/// and `slot-id` (which token), `object` (the object's label, `CKA_LABEL`), `id` (its `CKA_ID`,
/// bytes, `%`-escaped) and `type` (`private`, `cert`, ...). Query attributes: `module-path`
/// (required: the PKCS#11 module to load), and `pin-value` or `pin-source` (a file with the PIN).
/// Any other attribute is refused rather than ignored, so that a URL never silently names a
/// different object than its author meant.
///
/// The URL is shown ([`Display`](fmt::Display), errors, logs) with the PIN masked:
/// `pin-value=***`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Url {
    masked: String,
    /// `token`: the token's label.
    pub token: Option<String>,
    /// `manufacturer`: the token's manufacturer id.
    pub manufacturer: Option<String>,
    /// `model`: the token's model.
    pub model: Option<String>,
    /// `serial`: the token's serial number.
    pub serial: Option<String>,
    /// `slot-id`: the slot the token is in.
    pub slot_id: Option<u64>,
    /// `object`: the object's label (`CKA_LABEL`).
    pub object: Option<String>,
    /// `id`: the object's id (`CKA_ID`), decoded.
    pub id: Option<Vec<u8>>,
    /// `type`: the kind of object.
    pub object_type: Option<ObjectType>,
    /// `module-path`: the PKCS#11 module (a shared library) to load.
    pub module_path: PathBuf,
    /// `pin-value` or `pin-source`, if either is given.
    pub pin: Option<PinSource>,
}

impl fmt::Display for Pkcs11Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked)
    }
}

/// Whether `url` is a `pkcs11:` URL (the scheme is case-insensitive).
pub fn is_pkcs11_url(url: &str) -> bool {
    url.get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("pkcs11:"))
}

/// `url` as it may be shown: for a `pkcs11:` URL, the value of its `pin-value` attribute is
/// replaced with `***` (even when the rest of the URL is malformed); any other URL as it is.
pub fn mask_pin(url: &str) -> Cow<'_, str> {
    if !is_pkcs11_url(url) {
        return Cow::Borrowed(url);
    }
    let Some((path, query)) = url.split_once('?') else {
        return Cow::Borrowed(url);
    };
    if !query
        .split('&')
        .any(|attr| attr.split('=').next() == Some("pin-value"))
    {
        return Cow::Borrowed(url);
    }
    let query: Vec<String> = query
        .split('&')
        .map(|attr| match attr.split_once('=') {
            Some(("pin-value", _)) => format!("pin-value={MASKED_PIN}"),
            _ => attr.to_owned(),
        })
        .collect();
    Cow::Owned(format!("{path}?{}", query.join("&")))
}

impl Pkcs11Url {
    /// Parses `url`; a malformed or unsupported URL is an [`Error::UnsupportedUrl`] that shows
    /// the URL with its PIN masked and says what is wrong.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let masked = mask_pin(url).into_owned();
        let bad = |reason: String| Error::UnsupportedUrl {
            url: masked.clone(),
            reason,
        };
        if !is_pkcs11_url(url) {
            return Err(bad("not a pkcs11: URL".to_owned()));
        }
        let rest = &url[7..];
        if rest.contains('#') {
            return Err(bad("a pkcs11: URL has no fragment".to_owned()));
        }
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, query),
            None => (rest, ""),
        };
        let mut parsed = Self {
            masked: masked.clone(),
            token: None,
            manufacturer: None,
            model: None,
            serial: None,
            slot_id: None,
            object: None,
            id: None,
            object_type: None,
            module_path: PathBuf::new(),
            pin: None,
        };
        let mut seen: Vec<&str> = Vec::new();
        for attr in path.split(';').filter(|attr| !attr.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| bad(format!("path attribute {attr:?} has no '='")))?;
            if seen.contains(&name) {
                return Err(bad(format!("attribute {name:?} given twice")));
            }
            seen.push(name);
            let bytes =
                percent_decode(value).ok_or_else(|| bad(format!("bad %-escape in {name}")))?;
            let text = || {
                String::from_utf8(bytes.clone())
                    .map_err(|_| bad(format!("{name} is not UTF-8 once decoded")))
            };
            match name {
                "token" => parsed.token = Some(text()?),
                "manufacturer" => parsed.manufacturer = Some(text()?),
                "model" => parsed.model = Some(text()?),
                "serial" => parsed.serial = Some(text()?),
                "slot-id" => {
                    parsed.slot_id = Some(
                        text()?
                            .parse()
                            .map_err(|_| bad("slot-id is not a number".to_owned()))?,
                    );
                }
                "object" => parsed.object = Some(text()?),
                "id" => parsed.id = Some(bytes),
                "type" => {
                    let value = text()?;
                    parsed.object_type = Some(ObjectType::parse(&value).ok_or_else(|| {
                        bad(format!(
                            "type {value:?} is not one of private, public, cert, secret-key, data"
                        ))
                    })?);
                }
                other => {
                    return Err(bad(format!(
                        "path attribute {other:?} is not supported (token, manufacturer, model, \
                         serial, slot-id, object, id, type are)"
                    )));
                }
            }
        }
        let mut module_path = None;
        for attr in query.split('&').filter(|attr| !attr.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| bad(format!("query attribute {attr:?} has no '='")))?;
            if seen.contains(&name) {
                return Err(bad(format!("attribute {name:?} given twice")));
            }
            seen.push(name);
            let value = percent_decode(value)
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "bad %-escape in {name} (or not UTF-8 once decoded)"
                    ))
                })?;
            match name {
                "module-path" => {
                    let path = PathBuf::from(&value);
                    if !path.is_absolute() {
                        return Err(bad("module-path must be an absolute path".to_owned()));
                    }
                    module_path = Some(path);
                }
                "pin-value" => parsed.pin = Some(PinSource::Value(value)),
                "pin-source" => {
                    let path = loader::path_of_url(&value).map_err(|_| {
                        bad(format!(
                            "pin-source {value:?} is not a file:// URL nor an absolute path"
                        ))
                    })?;
                    parsed.pin = Some(PinSource::File(path));
                }
                "module-name" => {
                    return Err(bad(
                        "module-name is not supported; name the module with module-path".to_owned(),
                    ));
                }
                other => {
                    return Err(bad(format!(
                        "query attribute {other:?} is not supported (module-path, pin-value, \
                         pin-source are)"
                    )));
                }
            }
        }
        if seen.contains(&"pin-value") && seen.contains(&"pin-source") {
            return Err(bad("give pin-value or pin-source, not both".to_owned()));
        }
        parsed.module_path = module_path.ok_or_else(|| {
            bad("module-path is missing (the PKCS#11 module to load, e.g. \
                 ?module-path=/usr/lib/softhsm/libsofthsm2.so)"
                .to_owned())
        })?;
        Ok(parsed)
    }

    /// The URL with its PIN masked, as [`Display`](fmt::Display) shows it.
    pub fn masked(&self) -> &str {
        &self.masked
    }

    /// What the URL says about the object, for a message: `object="sm", id=%01`.
    pub fn describe_object(&self) -> String {
        let mut parts = Vec::new();
        if let Some(object) = &self.object {
            parts.push(format!("object={object:?}"));
        }
        if let Some(id) = &self.id {
            let hex: String = id.iter().map(|byte| format!("%{byte:02X}")).collect();
            parts.push(format!("id={hex}"));
        }
        if parts.is_empty() {
            "any label and id".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// Checks that `url` names something the [`CredentialsBuilder`](crate::CredentialsBuilder) can
/// load from: a `file://` URL or absolute path (see [`path_of_url`](crate::path_of_url)) or,
/// with the `pkcs11` feature, a well-formed `pkcs11:` URL. For a configuration checked before
/// anything is loaded; the error shows the URL with its PIN masked.
pub fn check_url(url: &str) -> Result<(), Error> {
    if !is_pkcs11_url(url) {
        return loader::path_of_url(url).map(|_| ());
    }
    Pkcs11Url::parse(url)?;
    if cfg!(feature = "pkcs11") {
        Ok(())
    } else {
        Err(Error::UnsupportedUrl {
            url: mask_pin(url).into_owned(),
            reason: "this build cannot load from a token (pkcs11: URLs need the `pkcs11` \
                     feature of smcontroller-certs)"
                .to_owned(),
        })
    }
}

/// The bytes `s` stands for, `%XX` escapes decoded; `None` for a bad escape.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULE: &str = "module-path=/usr/lib/softhsm/libsofthsm2.so";

    fn reason(url: &str) -> String {
        match Pkcs11Url::parse(url) {
            Err(Error::UnsupportedUrl { url: shown, reason }) => {
                assert!(!shown.contains("s3cret"), "PIN shown: {shown}");
                reason
            }
            other => panic!("{url}: {other:?}"),
        }
    }

    #[test]
    fn pkcs11_url_with_every_attribute_parses() {
        let url = Pkcs11Url::parse(&format!(
            "pkcs11:token=aos;manufacturer=SoftHSM%20project;model=SoftHSM%20v2;serial=1234;\
             slot-id=7;object=sm;id=%01%ff;type=private?{MODULE}&pin-value=s3cret"
        ))
        .unwrap();
        assert_eq!(url.token.as_deref(), Some("aos"));
        assert_eq!(url.manufacturer.as_deref(), Some("SoftHSM project"));
        assert_eq!(url.model.as_deref(), Some("SoftHSM v2"));
        assert_eq!(url.serial.as_deref(), Some("1234"));
        assert_eq!(url.slot_id, Some(7));
        assert_eq!(url.object.as_deref(), Some("sm"));
        assert_eq!(url.id.as_deref(), Some(&[1, 0xff][..]));
        assert_eq!(url.object_type, Some(ObjectType::Private));
        assert_eq!(
            url.module_path,
            PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")
        );
        assert_eq!(url.pin, Some(PinSource::Value("s3cret".into())));
        assert!(url.to_string().ends_with("&pin-value=***"), "{url}");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert_eq!(url.describe_object(), "object=\"sm\", id=%01%FF");
    }

    #[test]
    fn pkcs11_pin_source_is_a_file() {
        let url =
            Pkcs11Url::parse(&format!("pkcs11:object=sm?{MODULE}&pin-source=/run/pin")).unwrap();
        assert_eq!(url.pin, Some(PinSource::File("/run/pin".into())));
        let url = Pkcs11Url::parse(&format!(
            "pkcs11:object=sm?{MODULE}&pin-source=file:///run/p%20in"
        ))
        .unwrap();
        assert_eq!(url.pin, Some(PinSource::File("/run/p in".into())));
        assert!(
            reason(&format!("pkcs11:object=sm?{MODULE}&pin-source=pin.txt")).contains("pin-source")
        );
    }

    #[test]
    fn pkcs11_urls_that_cannot_be_used_say_why_with_the_pin_masked() {
        let pin = "pin-value=s3cret";
        assert!(reason(&format!("pkcs11:object=sm?{pin}")).contains("module-path is missing"));
        assert!(
            reason(&format!("pkcs11:object=sm?module-path=libx.so&{pin}")).contains("absolute")
        );
        assert!(reason(&format!("pkcs11:object=sm;object=x?{MODULE}&{pin}")).contains("twice"));
        assert!(
            reason(&format!("pkcs11:library-version=1?{MODULE}&{pin}")).contains("not supported")
        );
        assert!(reason(&format!("pkcs11:object=sm?{MODULE}&{pin}&x=1")).contains("not supported"));
        assert!(
            reason(&format!("pkcs11:object=sm?module-name=softhsm2&{pin}")).contains("module-path")
        );
        assert!(reason(&format!("pkcs11:id=%zz?{MODULE}&{pin}")).contains("%-escape"));
        assert!(reason(&format!("pkcs11:type=key?{MODULE}&{pin}")).contains("type"));
        assert!(reason(&format!("pkcs11:objectsm?{MODULE}&{pin}")).contains("no '='"));
        assert!(
            reason(&format!("pkcs11:object=sm?{MODULE}&{pin}&pin-source=/p")).contains("not both")
        );
    }

    #[test]
    fn pkcs11_pin_is_masked_wherever_the_url_is_shown() {
        assert_eq!(
            mask_pin("pkcs11:object=sm?pin-value=1234&module-path=/m.so"),
            "pkcs11:object=sm?pin-value=***&module-path=/m.so"
        );
        assert_eq!(
            mask_pin("PKCS11:object=sm?module-path=/m.so&pin-value=1234"),
            "PKCS11:object=sm?module-path=/m.so&pin-value=***"
        );
        assert_eq!(mask_pin("pkcs11:object=sm"), "pkcs11:object=sm");
        assert_eq!(mask_pin("file:///a?pin-value=1"), "file:///a?pin-value=1");
    }

    #[test]
    fn pkcs11_check_url_takes_files_and_token_urls() {
        check_url("file:///pki/sm.pem").unwrap();
        check_url("/pki/sm.pem").unwrap();
        let token = check_url(&format!("pkcs11:object=sm?{MODULE}&pin-value=1234"));
        if cfg!(feature = "pkcs11") {
            token.unwrap();
        } else {
            let e = token.unwrap_err().to_string();
            assert!(
                e.contains("`pkcs11` feature") && e.contains("pin-value=***"),
                "{e}"
            );
        }
        assert!(check_url("pkcs11:object=sm").is_err());
        assert!(check_url("relative.pem").is_err());
    }
}
