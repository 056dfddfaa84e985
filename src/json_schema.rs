//! JSON Schema checks shared by the request edge (is a caller's schema a
//! schema?) and by every structured answer (does the output satisfy it?).

use serde_json::Value;

/// A compiled JSON Schema.
pub struct OutputSchema {
    schema: Value,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for OutputSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputSchema")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl OutputSchema {
    /// Compiles a schema; the error says what makes it invalid.
    pub fn compile(schema: Value) -> Result<Self, String> {
        if !schema.is_object() {
            return Err("a JSON Schema must be a JSON object".to_owned());
        }
        jsonschema::meta::validate(&schema).map_err(|error| error.to_string())?;
        let validator = jsonschema::validator_for(&schema).map_err(|error| error.to_string())?;
        Ok(Self { schema, validator })
    }

    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// Parses `text` as JSON and checks it; the error names the first
    /// violation and where it is.
    pub fn check(&self, text: &str) -> Result<Value, String> {
        let value: Value = serde_json::from_str(text)
            .map_err(|error| format!("the output is not JSON: {error}"))?;
        // Most answers are valid: the quick yes/no first, the walk that
        // names the violation only for those that are not.
        if self.validator.is_valid(&value) {
            return Ok(value);
        }
        if let Some(error) = self.validator.iter_errors(&value).next() {
            let path = error.instance_path().to_string();
            let place = if path.is_empty() {
                "/".to_owned()
            } else {
                path
            };
            return Err(format!(
                "the output violates the schema at {place}: {error}"
            ));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn malformed_schemas_are_refused() {
        assert!(OutputSchema::compile(json!("string")).is_err());
        assert!(OutputSchema::compile(json!({"type": "no-such-type"})).is_err());
        assert!(OutputSchema::compile(json!({"type": "object", "minProperties": -1})).is_err());
    }

    #[test]
    fn violations_name_their_place() {
        let schema = OutputSchema::compile(json!({
            "type": "object",
            "properties": {"n": {"type": "integer", "maximum": 3}},
            "required": ["n"]
        }))
        .unwrap();
        assert_eq!(schema.check(r#"{"n": 2}"#).unwrap(), json!({"n": 2}));
        let error = schema.check(r#"{"n": 9}"#).unwrap_err();
        assert!(error.contains("/n"), "{error}");
        assert!(schema.check(r#"{"n": 2"#).unwrap_err().contains("not JSON"));
    }
}
