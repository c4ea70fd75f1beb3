//! Checks shared by the API's request bodies; each failure is a 422 (413 for sizes) naming the
//! field.

use std::fmt::Display;

use serde_json::Value;

use super::error::ApiError;

/// Longest name (command type, queue).
pub const MAX_NAME_LEN: usize = keel_store::MAX_QUEUE_NAME_LEN;

/// Most queues an agent may serve, or a claim may name.
pub const MAX_QUEUES: usize = keel_store::MAX_QUEUES_PER_CLAIM;

/// A name (queue, command type): the store's one rule, 1 to 64 characters of
/// `a-z A-Z 0-9 _ . : -`.
pub fn check_name(field: &str, value: &str) -> Result<(), ApiError> {
    keel_store::check_queue_name(value)
        .map_err(|rule| ApiError::Validation(format!("{field}: {rule}")))
}

/// A name as the OpenAPI document shows it (what [`check_name`] accepts).
#[derive(utoipa::ToSchema)]
#[schema(pattern = "^[a-zA-Z0-9_.:-]{1,64}$")]
pub struct Name(pub String);

/// A number within `min..=max`.
pub fn check_range<T: PartialOrd + Display>(
    field: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ApiError> {
    if value >= min && value <= max {
        Ok(())
    } else {
        Err(ApiError::Validation(format!(
            "{field}: must be between {min} and {max}, got {value}"
        )))
    }
}

/// A JSON value of at most `limit` bytes serialised (413 beyond).
pub fn check_size(field: &'static str, value: &Value, limit: usize) -> Result<(), ApiError> {
    let size = serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len());
    if size > limit {
        return Err(ApiError::FieldTooLarge { field, limit });
    }
    Ok(())
}

/// `err`, about a field of the object at `path` (`command`), naming the field from the top:
/// `command.queue: …`; an error about the object as a whole reads `command: …`. A value over
/// its size limit is a 422 here, naming the field and the limit.
pub fn within(path: &str, err: ApiError) -> ApiError {
    match err {
        ApiError::Validation(what) => {
            let names_a_field = what.split_once(": ").is_some_and(|(field, _)| {
                !field.is_empty()
                    && field
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || matches!(b, b'_' | b'.'))
            });
            if names_a_field {
                ApiError::Validation(format!("{path}.{what}"))
            } else {
                ApiError::Validation(format!("{path}: {what}"))
            }
        }
        ApiError::FieldTooLarge { field, limit } => {
            ApiError::Validation(format!("{path}.{field}: larger than {limit} bytes"))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_within_an_object_name_the_field_from_the_top() {
        let named = within("command", ApiError::Validation("queue: 1 to 64".to_owned()));
        assert!(matches!(named, ApiError::Validation(m) if m == "command.queue: 1 to 64"));
        let whole = within(
            "command",
            ApiError::Validation("missing field `type`".to_owned()),
        );
        assert!(matches!(whole, ApiError::Validation(m) if m == "command: missing field `type`"));
        let large = within(
            "command",
            ApiError::FieldTooLarge {
                field: "params",
                limit: 16,
            },
        );
        assert!(
            matches!(large, ApiError::Validation(m) if m == "command.params: larger than 16 bytes")
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("type", "run_job").is_ok());
        assert!(check_name("type", "a.b:c-d").is_ok());
        assert!(check_name("type", "").is_err());
        assert!(check_name("type", "has space").is_err());
        assert!(check_name("type", &"x".repeat(65)).is_err());
    }

    #[test]
    fn ranges_are_inclusive() {
        assert!(check_range("limit", 1_u32, 1, 100).is_ok());
        assert!(check_range("limit", 100_u32, 1, 100).is_ok());
        assert!(check_range("limit", 0_u32, 1, 100).is_err());
        assert!(check_range("limit", u64::MAX, 0, 60).is_err());
    }

    #[test]
    fn sizes_are_limited() {
        assert!(check_size("params", &serde_json::json!({"a": 1}), 16).is_ok());
        assert!(matches!(
            check_size("params", &serde_json::json!({"a": "x".repeat(20)}), 16),
            Err(ApiError::FieldTooLarge {
                field: "params",
                limit: 16
            })
        ));
    }
}
