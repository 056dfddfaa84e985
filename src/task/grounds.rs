//! What an answer may say, judged against what its task gives: the words of
//! the task's title, description, reasoning, files, dependencies and project
//! context. A small model copies its worked examples, invents versions and
//! product names, leaks JSON markup into its text and drifts to other work;
//! each check here names the field that did and the rule it broke, so the
//! part can be left out or asked for again.

use std::{
    collections::HashSet,
    sync::{Arc, LazyLock},
};

use rust_stemmers::{Algorithm, Stemmer};

use super::{
    ProjectContext, TaskSpec,
    prompt::Example,
    violation::{Rule, Violation, is_filler},
};
use crate::meaning::{Embedding, Meaning};

/// Words any software task may use: sharing one with the task does not make
/// a text about it, and carrying one from a worked example is not copying.
const GENERIC_WORDS: &str = "\
add make create implement write use using update ensure set up build new support \
feature task work code system be is are can should must will not no so as at or \
if when then than more less other one two three first step part need needs \
needed do does done get gets have has what which who how why before after every \
any some only also there these those they them we you your user users project \
subtask split complexity enhancement kind choose help helps most way thing good \
well right correct correctly check test tests testing verify run change changes \
fix issue without out about like per via just still today now find finds return \
returns result results show shows list lists give gives let lets keep keeps \
allow allows handle include includes provide start stop open read save data file \
files page field fields value values name type error errors message messages \
text empty full time clear valid invalid within instead each many much same \
different once again already";

fn generic_words() -> &'static HashSet<&'static str> {
    static WORDS: LazyLock<HashSet<&'static str>> =
        LazyLock::new(|| GENERIC_WORDS.split_whitespace().collect());
    &WORDS
}

/// Acronyms a software text may use without its task naming them.
const COMMON_ACRONYMS: &[&str] = &[
    "API", "UI", "URL", "URI", "ID", "HTTP", "HTTPS", "JSON", "HTML", "CSS", "SQL", "CLI", "UX",
    "FAQ", "OK", "README", "TODO", "CI", "CD", "AI", "DB", "OS", "QA", "SDK", "CRUD", "REST",
];

/// Characters of markup and code that plain task text does not carry.
const MARKUP: &[char] = &['{', '}', '[', ']', '<', '>', '`', '|', '\\'];

/// Punctuation a text does not start with.
const STRAY_FIRST: &[char] = &['-', '*', '#', ':', ';', ',', '.', '!', '?', '=', '+', '/'];

/// Quote-colon pairs of a dict or JSON literal (`'key': ...`).
const LITERAL_KEYS: &[&str] = &["':", "\":"];

/// Words in a row that a text and a worked example share, from which on the
/// text is taken from the example (when one of them is a word of the example
/// the task does not have): "Search ignores letter case" copies, a shared
/// "the search page" alone does not.
const COPIED_RUN: usize = 3;

/// Words of one worked example that the task does not have, in one text,
/// from which on the text retells the example in other words.
const COPIED_MIN_WORDS: usize = 4;

/// Share of a text's words starting with a capital from which on it is
/// written in title case, where capitals do not mark names.
const TITLE_CASE_SHARE: f64 = 0.6;

/// A task's inputs, read once, against which each text of an answer is
/// checked.
#[derive(Clone)]
pub(super) struct Grounds {
    /// Stems of the inputs' words that say what the task is about.
    stems: HashSet<String>,
    /// The inputs' words, lowercased.
    words: HashSet<String>,
    /// The inputs, lowercased: paths, file names and versions ("v2.1",
    /// "src/api.rs") are looked up whole in them.
    text: String,
    /// The worked examples, as far as the task does not contain them.
    examples: Vec<ExampleContent>,
    /// The task's meaning, where the semantic check is on.
    meaning: Option<TaskMeaning>,
}

/// How close in meaning a part of an answer must be to its task, if the
/// service checks meaning at all (`--on-topic-similarity`).
#[derive(Clone, Default)]
pub struct OnTopic {
    semantic: Option<(Arc<Meaning>, f32)>,
}

impl OnTopic {
    /// Parts must share a content word with the task, and be at least
    /// `min_similarity` close to it by `meaning`.
    pub fn semantic(meaning: Arc<Meaning>, min_similarity: f32) -> Self {
        Self {
            semantic: Some((meaning, min_similarity)),
        }
    }

    /// Parts must share a content word with the task; meaning is not
    /// checked.
    pub fn lexical() -> Self {
        Self::default()
    }
}

#[derive(Clone)]
struct TaskMeaning {
    model: Arc<Meaning>,
    task: Embedding,
    min_similarity: f32,
}

impl Grounds {
    pub fn of(
        task: &TaskSpec,
        context: &ProjectContext,
        examples: &[Example],
        on_topic: &OnTopic,
    ) -> Self {
        let inputs = inputs(task, context);
        let stems: HashSet<String> = topic_stems(&inputs).collect();
        let examples = examples
            .iter()
            .map(|example| ExampleContent::of(example, &stems))
            .collect();
        let text = inputs.to_lowercase();
        // What the task says it is, not the project around it: a long
        // context or file would pull every part towards itself.
        let meaning = on_topic
            .semantic
            .as_ref()
            .map(|(model, min_similarity)| TaskMeaning {
                task: model.embed(&task_statement(task)),
                model: model.clone(),
                min_similarity: *min_similarity,
            });
        Self {
            stems,
            words: words(&text).map(str::to_owned).collect(),
            text,
            examples,
            meaning,
        }
    }

    /// These grounds and `text` (accepted parts of the answer) together.
    pub fn widened(&self, text: &str) -> Self {
        let lower = text.to_lowercase();
        let mut widened = self.clone();
        widened.stems.extend(topic_stems(text));
        widened.words.extend(words(&lower).map(str::to_owned));
        widened.text.push('\n');
        widened.text.push_str(&lower);
        widened
    }

    /// Checks one text of an answer (a title, description, reasoning or
    /// criterion) for markup, copied example content and specifics the
    /// task does not give.
    pub fn check(&self, field: &str, text: &str) -> Result<(), Violation> {
        self.well_formed(field, text)?;
        self.not_copied(field, text)?;
        self.supported(field, text)
    }

    /// Whether `text` (a subtask's title and description, or a criterion)
    /// is about the task: it, or `said_with` it (a subtask's reasoning),
    /// shares a content word with the task and, where meaning is checked,
    /// `text` alone is close enough to the task in meaning. A task without
    /// content words ("Do it") cannot be judged and lets everything pass.
    pub fn on_topic(&self, field: &str, text: &str, said_with: &str) -> Result<(), Violation> {
        if self.stems.is_empty() {
            return Ok(());
        }
        let shared = topic_stems(text)
            .chain(topic_stems(said_with))
            .any(|stem| self.stems.contains(&stem));
        if !shared {
            return Err(Violation::new(
                Rule::OffTopic,
                format!("{field} shares no content word with the task"),
            ));
        }
        let Some(meaning) = &self.meaning else {
            return Ok(());
        };
        let similarity = meaning.model.embed(text).similarity(&meaning.task);
        if similarity >= meaning.min_similarity {
            return Ok(());
        }
        Err(Violation::new(
            Rule::OffTopic,
            format!(
                "{field} is not about the task: its similarity in meaning to it is {similarity:.2}, under {:.2}",
                meaning.min_similarity
            ),
        ))
    }

    fn well_formed(&self, field: &str, text: &str) -> Result<(), Violation> {
        let malformed = |what: String| {
            Err(Violation::new(
                Rule::MalformedText,
                format!("{field} {what}, which the task does not"),
            ))
        };
        if let Some(mark) = text
            .chars()
            .find(|&mark| MARKUP.contains(&mark) && !self.text.contains(mark))
        {
            return malformed(format!("carries markup {mark:?}"));
        }
        if let Some(key) = LITERAL_KEYS
            .iter()
            .find(|&&key| text.contains(key) && !self.text.contains(key))
        {
            return malformed(format!("carries a literal's key marks {key:?}"));
        }
        if let Some(code) = text.split_whitespace().find(|word| {
            let word = word.trim_matches(|c: char| !c.is_alphanumeric() && c != '(' && c != ')');
            let identifier = word.contains("()")
                || word.split('_').filter(|piece| !piece.is_empty()).count() > 1;
            identifier && !self.text.contains(&word.to_lowercase())
        }) {
            return malformed(format!("carries the code fragment {code:?}"));
        }
        let first_word = text.split_whitespace().next().unwrap_or("");
        let quoted = first_word
            .chars()
            .next()
            .is_some_and(|quote| matches!(quote, '"' | '\'') && text[1..].contains(quote));
        if first_word.starts_with(|first: char| !first.is_alphanumeric())
            && !quoted
            && !self.text.contains(&first_word.to_lowercase())
        {
            return malformed(format!("starts with {first_word:?}"));
        }
        Ok(())
    }

    fn not_copied(&self, field: &str, text: &str) -> Result<(), Violation> {
        let lower = text.to_lowercase();
        let runs = runs(&lower);
        let stems: HashSet<String> = topic_stems(text).collect();
        for example in &self.examples {
            if let Some(run) = runs.iter().find(|run| example.runs.contains(*run)) {
                return Err(Violation::new(
                    Rule::CopiesExample,
                    format!(
                        "{field} repeats {:?} from the prompt's worked example",
                        run.join(" ")
                    ),
                ));
            }
            let mut retold: Vec<&String> = stems.intersection(&example.stems).collect();
            if retold.len() >= COPIED_MIN_WORDS {
                retold.sort();
                return Err(Violation::new(
                    Rule::CopiesExample,
                    format!(
                        "{field} carries words of the prompt's worked example that the task \
                         does not have: {retold:?}"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn supported(&self, field: &str, text: &str) -> Result<(), Violation> {
        let title_case = is_title_case(text);
        let mut sentence_start = true;
        for raw in text.split_whitespace() {
            let capital_is_normal = sentence_start || title_case;
            sentence_start = raw
                .trim_end_matches(['"', '\'', ')'])
                .ends_with(['.', '!', '?', ':', ';']);
            let token = raw.trim_matches(|c: char| !c.is_alphanumeric());
            // Paths, URLs, file names and versions are looked up whole;
            // other words piece by piece ("two-factor", "Flask's").
            let pieces: Vec<&str> = if token.contains(['/', '.']) {
                vec![token]
            } else {
                token
                    .split(|c: char| !c.is_alphanumeric())
                    .filter(|piece| !piece.is_empty())
                    .collect()
            };
            for piece in pieces {
                if self.gives(piece) {
                    continue;
                }
                if let Some(kind) = specific_kind(piece, capital_is_normal) {
                    return Err(Violation::new(
                        Rule::UnsupportedDetail,
                        format!("{field} gives the {kind} {piece:?}, which the task does not"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the task's inputs contain `token`: as a word, or whole where
    /// it is a path, file name or version.
    fn gives(&self, token: &str) -> bool {
        let lower = token.to_lowercase();
        self.words.contains(&lower) || (token.contains(['/', '.']) && self.text.contains(&lower))
    }
}

/// Everything the task gives, one field per line.
fn inputs(task: &TaskSpec, context: &ProjectContext) -> String {
    [
        task.title.as_str(),
        task.description.as_deref().unwrap_or(""),
        task.reasoning.as_deref().unwrap_or(""),
        &task.context_files.join("\n"),
        &task.dependencies.join("\n"),
        &context.project,
        &context.prd_excerpt,
    ]
    .join("\n")
}

/// What the task itself says: its title and description.
fn task_statement(task: &TaskSpec) -> String {
    match &task.description {
        Some(description) => format!("{}\n{description}", task.title),
        None => task.title.clone(),
    }
}

/// What every text field of an answer to a task is generated under: none
/// of the markup the task lacks, no digits when the task has none (a figure
/// it does not give is invented), no line breaks, and no stray punctuation
/// first. Backends that constrain decoding by the schema then cannot write
/// what `malformed_text` and the figures of `unsupported_detail` reject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextPattern {
    /// Characters a text does not start with, beyond `rest` and whitespace,
    /// as a regular-expression class body.
    pub(super) first: String,
    /// Characters a text does not contain (line breaks and other control
    /// characters always).
    pub(super) rest: String,
    /// The stems of the task title's content words, one of which a text
    /// about the task contains.
    pub(super) topic: Vec<String>,
}

impl TextPattern {
    pub(super) fn of(task: &TaskSpec, context: &ProjectContext) -> Self {
        let inputs = inputs(task, context);
        let mut banned: Vec<char> = MARKUP
            .iter()
            .copied()
            .filter(|mark| !inputs.contains(*mark))
            .collect();
        if !inputs.chars().any(|c| c.is_ascii_digit()) {
            banned.extend('0'..='9');
        }
        let mut topic: Vec<String> = Vec::new();
        for stem in topic_stems(&task.title) {
            if !topic.contains(&stem) {
                topic.push(stem);
            }
        }
        Self {
            first: class(STRAY_FIRST),
            rest: class(&banned),
            topic,
        }
    }

    /// The regular expression of a text of `min..=max` characters.
    pub fn of_length(&self, min: usize, max: usize) -> String {
        format!(
            "^{}{}{{{},{}}}$",
            self.first_char(),
            self.any_char(),
            min.saturating_sub(1),
            max.saturating_sub(1)
        )
    }

    /// The regular expression of a text of at most `max` characters that
    /// names the task's subject (a word of its title) within its first half:
    /// the model cannot drift to other work without tying it to this task.
    /// Without such words in the title, [`Self::of_length`] with `min`.
    pub fn about(&self, min: usize, max: usize) -> String {
        let lengths = self.topic.iter().map(|stem| stem.chars().count());
        let (shortest, longest) = (lengths.clone().min(), lengths.max());
        let (Some(shortest), Some(longest)) = (shortest, longest) else {
            return self.of_length(min, max);
        };
        let head = (max - 1) / 2;
        // At least `min` characters wherever the word falls.
        let tail_min = min.saturating_sub(1 + shortest);
        let Some(tail) = (max - 1)
            .checked_sub(head + longest)
            .filter(|&tail| tail >= tail_min)
        else {
            return self.of_length(min, max);
        };
        let alternatives: Vec<String> = self
            .topic
            .iter()
            .map(|stem| {
                let mut letters = stem.chars();
                let first = letters.next().expect("stems are not empty");
                format!("[{}{first}]{}", first.to_uppercase(), letters.as_str())
            })
            .collect();
        // The word starts the text or follows a space or punctuation, so
        // that "reset" is not found inside "preset".
        format!(
            "^(?:{}{any}{{0,{}}}[ \\-'\"(/])?(?:{}){any}{{{tail_min},{tail}}}$",
            self.first_char(),
            head - 1,
            alternatives.join("|"),
            any = self.any_char(),
        )
    }

    fn first_char(&self) -> String {
        format!("[^\\s\\x00-\\x1f\\x7f{}{}]", self.first, self.rest)
    }

    fn any_char(&self) -> String {
        format!("[^\\x00-\\x1f\\x7f{}]", self.rest)
    }
}

/// `chars` escaped for a regular-expression class.
fn class(chars: &[char]) -> String {
    chars
        .iter()
        .map(|&c| match c {
            '\\' | ']' | '[' | '^' | '-' => format!("\\{c}"),
            c => c.to_string(),
        })
        .collect()
}

/// What of a worked example a text must not carry, as far as the task does
/// not contain it.
#[derive(Clone)]
struct ExampleContent {
    /// Stems of the example that the task does not have.
    stems: HashSet<String>,
    /// Runs of [`COPIED_RUN`] words of the example holding one of `stems`.
    runs: HashSet<Vec<String>>,
}

impl ExampleContent {
    fn of(example: &Example, task_stems: &HashSet<String>) -> Self {
        let mut text = example.task.clone();
        collect_strings(&example.answer, &mut text);
        let stems: HashSet<String> = topic_stems(&text)
            .filter(|stem| !task_stems.contains(stem))
            .collect();
        let runs = text
            .lines()
            .flat_map(|line| runs(&line.to_lowercase()))
            .filter(|run| {
                run.iter()
                    .any(|word| topic_stems(word).any(|stem| stems.contains(&stem)))
            })
            .collect();
        Self { stems, runs }
    }
}

/// The runs of [`COPIED_RUN`] words of the worked examples' answers that
/// hold a word the task does not have, as written there and with the space
/// before them: an answer must not complete one (`NoRepeat::already_said`),
/// so the engines that honour it cannot copy the example word for word.
pub(super) fn example_phrases(
    task: &TaskSpec,
    context: &ProjectContext,
    examples: &[Example],
) -> Vec<String> {
    let task_stems: HashSet<String> = topic_stems(&inputs(task, context)).collect();
    let mut phrases = Vec::new();
    for example in examples {
        let mut text = String::new();
        collect_strings(&example.answer, &mut text);
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            for run in words.windows(COPIED_RUN) {
                let phrase = format!(" {}", run.join(" "));
                if topic_stems(&phrase).any(|stem| !task_stems.contains(&stem))
                    && !phrases.contains(&phrase)
                {
                    phrases.push(phrase);
                }
            }
        }
    }
    phrases
}

/// Every [`COPIED_RUN`] words in a row of `text` (lowercased).
fn runs(text: &str) -> Vec<Vec<String>> {
    let words: Vec<String> = words(text).map(str::to_owned).collect();
    words.windows(COPIED_RUN).map(<[String]>::to_vec).collect()
}

/// What makes `token` a specific a model may not invent, if anything: a
/// figure or version, a path, URL or file name, or a name (CamelCase, an
/// uncommon acronym, or a capital where no sentence starts).
fn specific_kind(token: &str, capital_is_normal: bool) -> Option<&'static str> {
    if token.chars().any(|c| c.is_ascii_digit()) {
        return Some("figure or version");
    }
    if token.contains('/') && token.len() > 1 {
        return Some("path or URL");
    }
    if let Some((stem, extension)) = token.rsplit_once('.')
        && stem.chars().filter(|c| c.is_alphanumeric()).count() >= 2
        && (1..=5).contains(&extension.len())
        && extension.chars().all(|c| c.is_ascii_lowercase())
    {
        return Some("file name");
    }
    let camel = token
        .chars()
        .zip(token.chars().skip(1))
        .any(|(before, after)| before.is_lowercase() && after.is_uppercase());
    if camel {
        return Some("name");
    }
    // An acronym's plural ("APIs") is the acronym.
    let singular = token.strip_suffix('s').unwrap_or(token);
    if singular.len() >= 2 && singular.chars().all(|c| c.is_ascii_uppercase()) {
        return (!COMMON_ACRONYMS.contains(&singular)).then_some("name");
    }
    let capitalized = token.chars().next().is_some_and(char::is_uppercase);
    (capitalized && !capital_is_normal && token.chars().count() > 1).then_some("name")
}

/// Whether most words of `text` start with a capital ("Set Up The Build").
fn is_title_case(text: &str) -> bool {
    let words: Vec<&str> = text
        .split_whitespace()
        .filter(|word| word.starts_with(char::is_alphabetic))
        .collect();
    let capitalized = words
        .iter()
        .filter(|word| word.starts_with(char::is_uppercase))
        .count();
    words.len() > 1 && capitalized as f64 / words.len() as f64 >= TITLE_CASE_SHARE
}

/// The words of `text`: its runs of letters and digits.
fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
}

/// The stems of the words of `text` that can tell one task from another:
/// lowercased, neither filler nor generic, not figures.
fn topic_stems(text: &str) -> impl Iterator<Item = String> + '_ {
    let stemmer = Stemmer::create(Algorithm::English);
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| word.len() > 1 && word.chars().any(char::is_alphabetic))
        .map(str::to_lowercase)
        .filter(|word| !is_filler(word) && !generic_words().contains(word.as_str()))
        .map(move |word| stemmer.stem(&word).into_owned())
}

/// Appends every string inside `value` to `text`, one per line.
fn collect_strings(value: &serde_json::Value, text: &mut String) {
    match value {
        serde_json::Value::String(string) => {
            text.push('\n');
            text.push_str(string);
        }
        serde_json::Value::Array(items) => {
            items.iter().for_each(|item| collect_strings(item, text));
        }
        serde_json::Value::Object(fields) => {
            fields
                .values()
                .for_each(|field| collect_strings(field, text));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn grounds_of(title: &str, description: &str) -> Grounds {
        let task = TaskSpec {
            title: title.into(),
            description: (!description.is_empty()).then(|| description.into()),
            context_files: vec!["src/api.rs".into()],
            ..TaskSpec::default()
        };
        let example = Example {
            task: "Task: fix search\nProject: An online bookshop.".into(),
            answer: json!({
                "title": "Return matching books for partial title searches",
                "acceptance_criteria": [
                    "Searching 'potter' lists every Harry Potter book",
                    "Search ignores letter case"
                ]
            }),
        };
        Grounds::of(
            &task,
            &ProjectContext::default(),
            &[example],
            &OnTopic::lexical(),
        )
    }

    fn rule(result: Result<(), Violation>) -> Option<Rule> {
        result.err().map(|violation| violation.rule)
    }

    #[test]
    fn markup_and_stray_punctuation_the_task_lacks_are_malformed() {
        let grounds = grounds_of("Add async support for flask", "");
        for text in [
            "{'add'} - Add a custom implementation",
            "{'This is the second step",
            "The 'name': field is read",
            "- Add the handler",
            "Use `await` in views",
            "Call upload.static_path() first",
            "Set max_connections in the config",
        ] {
            assert_eq!(
                rule(grounds.check("title", text)),
                Some(Rule::MalformedText),
                "{text}"
            );
        }
        assert_eq!(
            rule(grounds.check("title", "Make flask views async.")),
            None
        );
        let json_task = grounds_of("Parse the {\"a\": 1} config", "");
        assert_eq!(
            rule(json_task.check("description", "Read {\"a\": 1} into a map")),
            None
        );
    }

    #[test]
    fn content_of_the_worked_example_is_copied_unless_the_task_has_it() {
        let grounds = grounds_of("Proposal: chart values schema", "");
        for copied in [
            "The chart search ignores letter case",
            "Searching the charts lists every Harry Potter book",
            "Match books by partial titles when searching",
        ] {
            assert_eq!(
                rule(grounds.check("acceptance_criteria[0]", copied)),
                Some(Rule::CopiesExample),
                "{copied}"
            );
        }
        assert_eq!(
            rule(grounds.check("acceptance_criteria[0]", "The chart lists every value")),
            None
        );
        let search_task = grounds_of("Search books by partial title", "");
        assert_eq!(
            rule(search_task.check("title", "Match partial titles when searching books")),
            None
        );
    }

    #[test]
    fn versions_names_and_paths_the_task_lacks_are_unsupported() {
        let grounds = grounds_of("Add async support for flask", "Views block on I/O.");
        for text in [
            "Add async support for Flask 3.0.1.1",
            "Views run on the Flaxpy framework",
            "Deploy it to AWS Lambda",
            "Move the views to app/views.py",
            "Wait at most 30 seconds",
            "Host the code on GitHub",
        ] {
            assert_eq!(
                rule(grounds.check("description", text)),
                Some(Rule::UnsupportedDetail),
                "{text}"
            );
        }
        for text in [
            "Flask views can be declared async.",
            "Views no longer block on I/O. Flask awaits them.",
            "Change src/api.rs to await the handlers",
            "Return JSON errors from the APIs",
            "Make Flask Views Async",
        ] {
            assert_eq!(rule(grounds.check("description", text)), None, "{text}");
        }
    }

    #[test]
    fn a_text_is_on_topic_when_it_shares_a_content_word_with_the_task() {
        let grounds = grounds_of(
            "sql: add support for LIMIT/OFFSET",
            "Paginate query results.",
        );
        assert_eq!(
            rule(grounds.on_topic("subtasks[2]", "Remove duplicate rows from the table", "")),
            Some(Rule::OffTopic)
        );
        assert_eq!(
            rule(grounds.on_topic("subtasks[0]", "Parse the LIMIT clause", "")),
            None
        );
        assert_eq!(
            rule(grounds.on_topic("subtasks[1]", "Page through the results of a query", "")),
            None
        );
        let no_content = TaskSpec {
            title: "Do it".into(),
            ..TaskSpec::default()
        };
        let vague = Grounds::of(
            &no_content,
            &ProjectContext::default(),
            &[],
            &OnTopic::lexical(),
        );
        assert_eq!(
            rule(vague.on_topic("subtasks[0]", "Anything at all", "")),
            None
        );
    }

    /// Whether a text is valid under a string schema with `pattern`, as the
    /// service's validator checks it.
    fn matcher(pattern: &str) -> impl Fn(&str) -> bool {
        let schema = crate::json_schema::OutputSchema::compile(
            json!({ "type": "string", "pattern": pattern }),
        )
        .unwrap();
        move |text| schema.check(&json!(text).to_string()).is_ok()
    }

    #[test]
    fn the_text_pattern_bans_the_markup_and_digits_the_task_lacks() {
        let plain = TaskSpec {
            title: "Add dark mode".into(),
            ..TaskSpec::default()
        };
        let pattern = TextPattern::of(&plain, &ProjectContext::default()).of_length(3, 60);
        let ok = matcher(&pattern);
        assert!(ok("Store the theme choice per user"));
        assert!(ok("\"Dark\" and 'light' themes (both) work."));
        for bad in [
            "{'add'} - Add a theme",
            "Use `prefers-color-scheme`",
            "Wait 30 seconds",
            "- Add a theme",
            " Add a theme",
            "Add a theme\nand more",
            "Add a [theme]",
            "Return <b>bold</b>",
            "No",
            "A theme that is far too long to be a title of sixty characters",
        ] {
            assert!(!ok(bad), "{bad}");
        }
        let coded = TaskSpec {
            title: "Read the {name} placeholder in config v2".into(),
            ..TaskSpec::default()
        };
        let pattern = TextPattern::of(&coded, &ProjectContext::default()).of_length(3, 60);
        let schema = crate::json_schema::OutputSchema::compile(
            json!({ "type": "string", "pattern": pattern }),
        )
        .unwrap();
        assert!(schema.check("\"Replace {name} in config v2\"").is_ok());
        assert!(schema.check("\"Replace [name]\"").is_err());
        assert!(
            schema.check("\"Replace\\u001b name\"").is_err(),
            "control characters"
        );
    }

    #[test]
    fn a_text_about_the_task_names_a_word_of_its_title() {
        let task = TaskSpec {
            title: "Add dark mode".into(),
            ..TaskSpec::default()
        };
        let pattern = TextPattern::of(&task, &ProjectContext::default()).about(10, 80);
        let ok = matcher(&pattern);
        assert!(ok("Store the chosen theme so dark pages stay dark"));
        assert!(ok("Mode switches are kept per user"));
        assert!(!ok("Store the chosen theme per user account"));
        assert!(
            !ok("Store the theme as an undarkened setting"),
            "a word start"
        );
        assert!(
            !ok(&format!("{} dark", "x".repeat(60))),
            "named in the first half"
        );
        let terse = TaskSpec {
            title: "Do it".into(),
            ..TaskSpec::default()
        };
        let pattern = TextPattern::of(&terse, &ProjectContext::default());
        assert_eq!(pattern.about(10, 80), pattern.of_length(10, 80));
    }

    #[test]
    fn example_phrases_are_the_runs_holding_words_the_task_lacks() {
        let example = Example {
            task: "Task: Archive old log files".into(),
            answer: json!({ "title": "Compress the old logs daily" }),
        };
        let task = TaskSpec {
            title: "Compress images".into(),
            ..TaskSpec::default()
        };
        let phrases = example_phrases(&task, &ProjectContext::default(), &[example]);
        assert_eq!(
            phrases,
            [" Compress the old", " the old logs", " old logs daily"]
        );
    }

    /// The examples teach what the rules demand: each answer's texts are
    /// well formed, give nothing their own task does not, and each subtask
    /// and criterion is about its task.
    #[test]
    fn the_worked_examples_obey_the_rules_they_teach() {
        use crate::task::prompt::examples;
        let examples = examples();
        for example in examples.enhance.iter().chain(&examples.decompose) {
            let task = TaskSpec {
                title: example.task.clone(),
                ..TaskSpec::default()
            };
            let grounds = Grounds::of(&task, &ProjectContext::default(), &[], &OnTopic::lexical());
            let parts: Vec<&serde_json::Value> = match example.answer.get("subtasks") {
                Some(subtasks) => subtasks.as_array().unwrap().iter().collect(),
                None => example.answer["acceptance_criteria"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .chain([&example.answer["title"], &example.answer["description"]])
                    .collect(),
            };
            for part in parts {
                let mut text = String::new();
                collect_strings(part, &mut text);
                for line in text.lines().filter(|line| !line.is_empty()) {
                    assert_eq!(grounds.check("example", line), Ok(()), "{line}");
                }
                assert_eq!(grounds.on_topic("example", &text, ""), Ok(()), "{text}");
            }
        }
    }
}
