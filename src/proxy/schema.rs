//! Cleaning tool `input_schema`s (JSON Schema draft 2020-12 as Claude Code sends them) into the
//! subset OpenAI-compatible servers accept. llama.cpp turns the schema into a GBNF grammar when a
//! tool call is required; keywords its converter does not know are either ignored or rejected, and
//! some (huge integer bounds) blow the grammar up. What each rule fixes is noted on the rule.

use serde_json::{Map, Value};

/// 2^53 - 1, JavaScript's `Number.MAX_SAFE_INTEGER`: zod emits it as the bound of every `int()`.
/// A bound this large constrains nothing and makes llama.cpp build a 16-digit range grammar.
const MEANINGLESS_BOUND: f64 = 9_007_199_254_740_991.0;

/// Keywords that only annotate or that the upstream grammar generators do not support.
/// - `$schema`, `$id`, `$comment`, `title`, `examples`, `default`, `deprecated`, `readOnly`,
///   `writeOnly`: annotations, no effect on validity.
/// - `propertyNames`: a constraint on map keys no grammar generator implements.
/// - `format`: llama.cpp only knows a few formats and rejects the rest of the string grammar.
const DROPPED_KEYWORDS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "title",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "propertyNames",
    "format",
];

/// Returns a cleaned copy of `schema`. Never fails: anything that is not an object is replaced by
/// the permissive `{"type":"object","properties":{}}` at the top level and kept as is below it.
pub fn clean_input_schema(schema: &Value) -> Value {
    let mut out = schema.clone();
    match out.as_object_mut() {
        Some(obj) => {
            clean_object(obj);
            // A function's parameters must be an object schema.
            if !obj.contains_key("type") {
                obj.insert("type".into(), Value::String("object".into()));
            }
            if obj.get("type").and_then(Value::as_str) == Some("object")
                && !obj.contains_key("properties")
            {
                obj.insert("properties".into(), Value::Object(Map::new()));
            }
            out
        }
        None => serde_json::json!({"type": "object", "properties": {}}),
    }
}

fn clean_value(v: &mut Value) {
    if let Some(obj) = v.as_object_mut() {
        clean_object(obj);
    }
}

fn clean_object(obj: &mut Map<String, Value>) {
    for k in DROPPED_KEYWORDS {
        obj.shift_remove(*k);
    }
    const_to_enum(obj);
    exclusive_bounds_to_inclusive(obj);
    drop_meaningless_bounds(obj);

    // Recurse into every place a sub-schema can live.
    for key in [
        "items",
        "additionalProperties",
        "not",
        "contains",
        "if",
        "then",
        "else",
    ] {
        if let Some(sub) = obj.get_mut(key) {
            clean_value(sub);
        }
    }
    for key in ["anyOf", "oneOf", "allOf", "prefixItems"] {
        if let Some(Value::Array(subs)) = obj.get_mut(key) {
            subs.iter_mut().for_each(clean_value);
        }
    }
    for key in ["properties", "$defs", "definitions", "patternProperties"] {
        if let Some(Value::Object(map)) = obj.get_mut(key) {
            map.values_mut().for_each(clean_value);
        }
    }
}

/// `const` → a one-value `enum`: older converters only know `enum`.
fn const_to_enum(obj: &mut Map<String, Value>) {
    if let Some(c) = obj.shift_remove("const") {
        obj.insert("enum".into(), Value::Array(vec![c]));
    }
}

/// Draft 2020-12 numeric `exclusiveMinimum`/`exclusiveMaximum` → inclusive bounds. Exact for
/// integers; for numbers the bound becomes inclusive (slightly looser, never stricter). The
/// draft-4 boolean form is dropped.
fn exclusive_bounds_to_inclusive(obj: &mut Map<String, Value>) {
    let integer = obj.get("type").and_then(Value::as_str) == Some("integer");
    for (exclusive, inclusive, step) in [
        ("exclusiveMinimum", "minimum", 1.0),
        ("exclusiveMaximum", "maximum", -1.0),
    ] {
        let Some(bound) = obj.shift_remove(exclusive) else {
            continue;
        };
        let Some(x) = bound.as_f64() else { continue };
        let new = if integer {
            let edge = if step > 0.0 { x.floor() } else { x.ceil() };
            number(edge + step)
        } else {
            bound
        };
        // Keep the tighter of an existing inclusive bound and the converted one.
        let keep_existing = match obj.get(inclusive).and_then(Value::as_f64) {
            Some(cur) => {
                let n = new.as_f64().unwrap_or(cur);
                if step > 0.0 { cur >= n } else { cur <= n }
            }
            None => false,
        };
        if !keep_existing {
            obj.insert(inclusive.into(), new);
        }
    }
}

fn drop_meaningless_bounds(obj: &mut Map<String, Value>) {
    for key in ["minimum", "maximum"] {
        if obj
            .get(key)
            .and_then(Value::as_f64)
            .is_some_and(|x| x.abs() >= MEANINGLESS_BOUND)
        {
            obj.shift_remove(key);
        }
    }
}

fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < MEANINGLESS_BOUND {
        Value::from(x as i64)
    } else {
        serde_json::Number::from_f64(x)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claude_code_read_schema() {
        let s = json!({"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","properties":{
            "file_path":{"description":"path","type":"string"},
            "offset":{"description":"o","type":"integer","minimum":0,"maximum":9007199254740991_u64},
            "limit":{"description":"l","type":"integer","exclusiveMinimum":0,"maximum":9007199254740991_u64},
            "pages":{"description":"p","type":"string"}},
            "required":["file_path"],"additionalProperties":false});
        let c = clean_input_schema(&s);
        assert_eq!(
            c,
            json!({"type":"object","properties":{
            "file_path":{"description":"path","type":"string"},
            "offset":{"description":"o","type":"integer","minimum":0},
            "limit":{"description":"l","type":"integer","minimum":1},
            "pages":{"description":"p","type":"string"}},
            "required":["file_path"],"additionalProperties":false})
        );
    }

    #[test]
    fn nested_keywords_are_cleaned_everywhere() {
        let s = json!({"type":"object","properties":{
            "m":{"type":"object","propertyNames":{"type":"string"},"additionalProperties":{"type":"string","format":"uri"}},
            "a":{"anyOf":[{"const":"x"},{"type":"array","items":{"type":"string","default":"d"}}]},
            "n":{"type":"number","exclusiveMaximum":2.5}}});
        let c = clean_input_schema(&s);
        assert_eq!(
            c,
            json!({"type":"object","properties":{
            "m":{"type":"object","additionalProperties":{"type":"string"}},
            "a":{"anyOf":[{"enum":["x"]},{"type":"array","items":{"type":"string"}}]},
            "n":{"type":"number","maximum":2.5}}})
        );
    }

    #[test]
    fn tighter_existing_bound_is_kept() {
        let c = clean_input_schema(
            &json!({"type":"object","properties":{"x":{"type":"integer","minimum":5,"exclusiveMinimum":0}}}),
        );
        assert_eq!(c["properties"]["x"], json!({"type":"integer","minimum":5}));
    }

    #[test]
    fn empty_or_missing_schema_becomes_an_empty_object_schema() {
        assert_eq!(
            clean_input_schema(&json!(null)),
            json!({"type":"object","properties":{}})
        );
        assert_eq!(
            clean_input_schema(&json!({})),
            json!({"type":"object","properties":{}})
        );
    }
}
