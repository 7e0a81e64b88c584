//! What a chat template (`tokenizer.chat_template`, Jinja) can do, judged by the names it uses.
//!
//! The heuristic, on purpose simple and explainable (the evidence is reported with the verdict):
//! - tools: the template reads the `tools` variable or renders `tool_calls` (every tool-capable template
//!   in llama.cpp's models/templates does at least one of these; templates without tools mention neither);
//! - thinking: the template mentions `enable_thinking` (Qwen3, Gemma 4, DeepSeek-R1 distills),
//!   `reasoning_content` (the OpenAI-compatible field llama.cpp fills), `<think>` (R1-style tags),
//!   `reasoning_effort` or a message's `thinking` field (gpt-oss, Gemma 4).
//!
//! A match means "the template has a code path for it", not a guarantee the model is good at it.

use regex::Regex;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateCaps {
    pub tools: bool,
    pub thinking: bool,
    /// The markers found, e.g. `["tools", "tool_calls", "enable_thinking"]`.
    pub evidence: Vec<String>,
}

const TOOL_MARKERS: &[&str] = &["tools", "tool_calls"];
const THINKING_MARKERS: &[&str] = &[
    "enable_thinking",
    "reasoning_content",
    "<think>",
    "reasoning_effort",
    "thinking",
];

pub fn analyze(template: &str) -> TemplateCaps {
    let mut evidence = Vec::new();
    let mut has = |markers: &[&str]| {
        let mut any = false;
        for m in markers {
            if contains_word(template, m) {
                evidence.push((*m).to_string());
                any = true;
            }
        }
        any
    };
    let tools = has(TOOL_MARKERS);
    let thinking = has(THINKING_MARKERS);
    TemplateCaps {
        tools,
        thinking,
        evidence,
    }
}

/// `word` as a whole identifier (so `tools` does not match `my_tools_list`), or literally for tag-like
/// markers such as `<think>`.
fn contains_word(text: &str, word: &str) -> bool {
    if !word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return text.contains(word);
    }
    let pattern = format!(r"(^|[^A-Za-z0-9_]){}($|[^A-Za-z0-9_])", regex::escape(word));
    Regex::new(&pattern).is_ok_and(|re| re.is_match(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_without_tools() {
        let t = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}";
        let caps = analyze(t);
        assert!(!caps.tools && !caps.thinking, "{caps:?}");
    }

    #[test]
    fn qwen3_style_tools_and_thinking() {
        let t = "{%- if tools %}{{- tool_call.name }}{%- endif %}{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>{% endif %}";
        let caps = analyze(t);
        assert!(caps.tools && caps.thinking, "{caps:?}");
        assert_eq!(caps.evidence, vec!["tools", "enable_thinking", "<think>"]);
    }

    #[test]
    fn identifiers_are_whole_words() {
        let caps = analyze("{{ my_tools_list }} {{ rethinking }}");
        assert!(!caps.tools && !caps.thinking, "{caps:?}");
    }
}
