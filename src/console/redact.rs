//! Redaction of payload fields the console shows (`RTPD_CONSOLE_REDACT`):
//! by field name, at any depth of the JSON payload.

use serde_json::Value;

/// The fields redacted when `RTPD_CONSOLE_REDACT` is not set: account and
/// card numbers and the like, by the names payment payloads give them.
pub const DEFAULT_FIELDS: &str = "iban,bban,account_number,account_no,card_number,pan,cvv,cvc,\
security_code,routing_number,sort_code,ssn,tax_id,national_id,date_of_birth";

/// What a redacted value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Field names whose values are hidden, compared without regard to case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redaction {
    fields: Vec<String>,
}

impl Redaction {
    /// From a comma-separated list; `none` (or an empty list) hides nothing.
    pub fn parse(list: &str) -> Redaction {
        if list.trim().eq_ignore_ascii_case("none") {
            return Redaction::default();
        }
        Redaction {
            fields: list
                .split(',')
                .map(|f| f.trim().to_ascii_lowercase())
                .filter(|f| !f.is_empty())
                .collect(),
        }
    }

    pub fn is_off(&self) -> bool {
        self.fields.is_empty()
    }

    pub fn fields(&self) -> &[String] {
        &self.fields
    }

    fn hides(&self, name: &str) -> bool {
        self.fields.iter().any(|f| f.eq_ignore_ascii_case(name))
    }

    /// Replaces the value of every hidden field, at any depth (inside
    /// objects and arrays); returns how many were replaced.
    pub fn apply(&self, v: &mut Value) -> usize {
        if self.is_off() {
            return 0;
        }
        match v {
            Value::Object(map) => map
                .iter_mut()
                .map(|(k, v)| {
                    if self.hides(k) {
                        *v = Value::String(REDACTED.into());
                        1
                    } else {
                        self.apply(v)
                    }
                })
                .sum(),
            Value::Array(items) => items.iter_mut().map(|v| self.apply(v)).sum(),
            _ => 0,
        }
    }

    /// The payload as the console shows it: the stored text exactly when
    /// nothing in it is hidden, else the JSON with hidden values replaced,
    /// pretty-printed. A payload that is not JSON (never accepted by
    /// intake) is not shown at all when redaction is on.
    pub fn shown(&self, payload: &str) -> Shown {
        if self.is_off() {
            return Shown::Exact(payload.to_owned());
        }
        let Ok(mut v) = serde_json::from_str::<Value>(payload) else {
            return Shown::Withheld;
        };
        match self.apply(&mut v) {
            0 => Shown::Exact(payload.to_owned()),
            n => Shown::Redacted {
                text: serde_json::to_string_pretty(&v).unwrap_or_default(),
                fields: n,
            },
        }
    }
}

/// A payload as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shown {
    /// Byte for byte as stored in the WAL.
    Exact(String),
    /// With `fields` values replaced by [`REDACTED`].
    Redacted { text: String, fields: usize },
    /// Not JSON, so not redactable: not shown.
    Withheld,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hides_fields_at_any_depth_whatever_their_case() {
        let r = Redaction::parse(DEFAULT_FIELDS);
        let mut v = json!({
            "transaction_id": "T1",
            "IBAN": "DE89370400440532013000",
            "debtor": {"name": "A", "account_number": 12345678, "cards": [{"pan": "4111111111111111"}]},
            "amount": "10.00"
        });
        assert_eq!(r.apply(&mut v), 3);
        assert_eq!(v["IBAN"], REDACTED);
        assert_eq!(v["debtor"]["account_number"], REDACTED);
        assert_eq!(v["debtor"]["cards"][0]["pan"], REDACTED);
        assert_eq!(v["amount"], "10.00");
        assert_eq!(v["debtor"]["name"], "A");
    }

    #[test]
    fn a_hidden_object_is_hidden_whole() {
        let r = Redaction::parse("iban");
        let mut v = json!({"iban": {"country": "DE", "number": "x"}});
        assert_eq!(r.apply(&mut v), 1);
        assert_eq!(v["iban"], REDACTED);
    }

    #[test]
    fn shows_the_exact_bytes_when_nothing_is_hidden() {
        let r = Redaction::parse(DEFAULT_FIELDS);
        let payload = r#"{"transaction_id":"T1",  "amount":"10.00"}"#;
        assert_eq!(r.shown(payload), Shown::Exact(payload.into()));
        match r.shown(r#"{"transaction_id":"T1","iban":"DE89"}"#) {
            Shown::Redacted { text, fields } => {
                assert_eq!(fields, 1);
                assert!(!text.contains("DE89"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn none_switches_it_off() {
        let r = Redaction::parse("none");
        assert!(r.is_off());
        let payload = r#"{"iban":"DE89"}"#;
        assert_eq!(r.shown(payload), Shown::Exact(payload.into()));
        assert!(Redaction::parse(" , ").is_off());
    }
}
