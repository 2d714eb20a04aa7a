//! Evaluating a rule on one contact: the `FILTER` as the server applies it, then `matches`.
//! A rule that cannot judge a contact returns an error with its position, never a panic.

use rhai::{CallFnOptions, Dynamic, Engine, EvalAltResult, Scope};

use super::{Date, Rule};
use crate::contact::{Contact, ContactRecord};
use crate::slots::{Fields, Leaf, Lookup};

/// Why a rule could not judge a contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalError {
    pub message: String,
    pub line: usize,
    pub col: usize,
}

impl std::fmt::Display for EvalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(f, "{} (line {}, column {})", self.message, self.line, self.col)
        } else {
            f.write_str(&self.message)
        }
    }
}

impl From<Box<EvalAltResult>> for EvalError {
    fn from(e: Box<EvalAltResult>) -> Self {
        let inner = e.unwrap_inner();
        let pos = if inner.position().is_none() { e.position() } else { inner.position() };
        let message = crate::diagnostic::without_rhai_position(inner.to_string());
        Self { message, line: pos.line().unwrap_or(0), col: pos.position().unwrap_or(0) }
    }
}

/// An answer of `matches` (true or false) or of `fn list` (a list name, or none), as the shadow
/// check's ERROR event writes it.
trait Answer {
    fn text(&self) -> String;
}

impl Answer for bool {
    fn text(&self) -> String {
        self.to_string()
    }
}

impl Answer for Option<String> {
    fn text(&self) -> String {
        self.clone().unwrap_or_else(|| "(no list)".into())
    }
}

/// The values of the fields a rule mentions, taken from a record before `matches` consumes it:
/// the facts a removal is recorded with.
#[derive(Debug, Clone, Default)]
pub struct Facts(Vec<Option<Dynamic>>);

impl Rule {
    /// The fields this rule mentions, read off `contact` (top level, else in `customFields`).
    pub fn facts(&self, contact: &ContactRecord) -> Facts {
        if !contact.is_map() {
            return Facts::default();
        }
        let fact = |path: &crate::slots::Path| match contact.lookup(path) {
            Lookup::Value(Leaf::Other) => contact.dynamic_at(path.names()),
            Lookup::Value(leaf) => Some(leaf.to_dynamic()),
            Lookup::Absent(_) | Lookup::NotMap => None,
        };
        Facts(
            self.mentions
                .iter()
                .zip(&self.mention_paths)
                .filter(|(w, _)| *w != "customFields")
                .map(|(_, [top, custom])| fact(top).or_else(|| fact(custom)))
                .collect(),
        )
    }

    /// `facts` as people read them: `customFields.totalSpent = 4200.0, region = "Veneto"`.
    pub fn describe(&self, facts: &Facts) -> String {
        let names = self.mentions.iter().filter(|w| *w != "customFields");
        let parts: Vec<String> = names
            .zip(&facts.0)
            .map(|(name, value)| match value {
                Some(v) => format!("{name} = {v:?}"),
                None => format!("{name} absent"),
            })
            .collect();
        if parts.is_empty() {
            "matches returned false".into()
        } else {
            format!("matches returned false: {}", parts.join(", "))
        }
    }

    /// Why `contact` fails `FILTER`: the first term it fails, with the value it has.
    pub fn filter_failure(&self, contact: &ContactRecord) -> String {
        if !contact.is_map() {
            return "FILTER: the contact is not an object".into();
        }
        for term in &self.filter {
            if term.judge(contact) == Ok(false) {
                let (key, value) = term.query_pair();
                return format!("FILTER {key} = {value:?} fails");
            }
        }
        "FILTER fails".into()
    }

    /// Whether the contact passes `FILTER`, judged as the server judges it. A record the filter
    /// cannot judge (a filtered field missing, null or of another type) is an error, exactly as
    /// reading that field inside `matches` would be.
    pub fn filter_verdict(&self, contact: &ContactRecord) -> Result<bool, EvalError> {
        if self.filter.is_empty() {
            return Ok(true);
        }
        if !contact.is_map() {
            return Err(EvalError { message: "the contact is not an object".into(), line: 0, col: 0 });
        }
        for term in &self.filter {
            match term.judge(contact) {
                Ok(true) => {}
                Ok(false) => return Ok(false),
                Err(message) => return Err(EvalError { message, line: 0, col: 0 }),
            }
        }
        Ok(true)
    }

    /// Whether a contact that is not a member is worth evaluating: the server's filter would have
    /// returned it. A record the filter cannot judge is one the server would not return.
    pub fn passes_filter(&self, contact: &ContactRecord) -> bool {
        matches!(self.filter_verdict(contact), Ok(true))
    }

    /// Whether `contact` belongs to the segment: it passes `FILTER` (as the server would judge
    /// it) and `matches` returns `true`. `today` is the run's frozen date.
    pub fn evaluate(&self, engine: &Engine, contact: &ContactRecord, today: Date) -> Result<bool, EvalError> {
        if !self.filter_verdict(contact)? {
            return Ok(false);
        }
        self.matches_on(engine, contact.contact(), today)
    }

    /// `matches` on a contact that already passed `FILTER` (for one list of a partitioned rule:
    /// whether `fn list` names that list). Rhai takes arguments by value, so the caller hands over
    /// the contact: a clone, or the record itself for its last evaluation.
    pub fn call_matches(&self, engine: &Engine, fields: Dynamic, today: Date) -> Result<bool, EvalError> {
        self.matches_on(engine, Contact::Owned(fields), today)
    }

    /// [`Rule::call_matches`] on a record the caller keeps: the native evaluator reads it in
    /// place, and only a record left to Rhai is copied (a narrowed one parsed again, whole).
    pub fn call_record(&self, engine: &Engine, record: &ContactRecord, today: Date) -> Result<bool, EvalError> {
        self.matches_on(engine, record.contact(), today)
    }

    /// [`Rule::call_matches`] on a contact the caller keeps: the native evaluator reads it in
    /// place, and only a record left to Rhai is copied.
    pub fn call_matches_ref(&self, engine: &Engine, fields: &Dynamic, today: Date) -> Result<bool, EvalError> {
        self.matches_on(engine, Contact::Borrowed(fields), today)
    }

    fn matches_on(&self, engine: &Engine, contact: Contact<'_>, today: Date) -> Result<bool, EvalError> {
        if self.is_partitioned() {
            let listed = self.list_on(engine, contact, today)?;
            return Ok(listed.as_deref() == Some(self.list.as_str()));
        }
        if let Some(native) = self.native_now()
            && let Ok(verdict) = native.judge(&contact, today.0)
        {
            return self.shadowed(native, contact, verdict, |f| self.rhai_matches(engine, f, today));
        }
        self.rhai_matches(engine, contact.into_reading(self.rhai_reads.as_deref()), today)
    }

    /// A native answer, except for the one record in [`super::native::SHADOW_EVERY`] that Rhai
    /// judges too: then Rhai's answer wins, and a disagreement retires the native evaluator (the
    /// run fails: see `ReconcileError::NativeDisagreed`) with one ERROR event.
    fn shadowed<T: PartialEq + Answer>(
        &self,
        native: &super::native::Native,
        contact: Contact<'_>,
        answer: T,
        rhai: impl FnOnce(Dynamic) -> Result<T, EvalError>,
    ) -> Result<T, EvalError> {
        if !native.shadow_due() {
            return Ok(answer);
        }
        let id = contact.id_text();
        let rhai = rhai(contact.into_full());
        if rhai.as_ref() != Ok(&answer) && native.retire() {
            tracing::error!(
                rule = %self.name,
                contact_id = id.unwrap_or_default(),
                native = %answer.text(),
                rhai = %rhai.as_ref().map_or_else(|e| format!("error: {e}"), Answer::text),
                "native verdict differs"
            );
        }
        rhai
    }

    /// The native evaluator, when this rule is judged natively now.
    fn native_now(&self) -> Option<&super::native::Native> {
        self.native.as_ref().ok().map(|n| &**n).filter(|n| n.active() && super::native::enabled())
    }

    /// Whether `matches` reads a record in place (natively), so handing it over saves no copy.
    pub fn reads_in_place(&self) -> bool {
        self.native_now().is_some()
    }

    /// A record's fields for this rule's Rhai call, at the record's last use: taken, not copied,
    /// and only those the rule's Rhai code reads when the record kept just those.
    pub fn take_record(&self, record: &mut ContactRecord) -> Dynamic {
        record.take_reading(self.rhai_reads.as_deref())
    }

    /// The contact's top-level fields judging this rule reads (its `FILTER`, its `matches` or
    /// `list` as it runs now, the fields it mentions, which facts and findings read); `None` when
    /// it may read any field (see `fields::read_by`), so its reads keep every field.
    pub fn reads(&self) -> Option<Vec<String>> {
        let mut names = match self.native_now() {
            Some(native) => native.top_fields()?,
            None => self.rhai_reads.clone()?,
        };
        for term in &self.filter {
            names.push(term.top_field().to_owned());
        }
        for name in self.mentions.iter().filter(|m| *m != "customFields") {
            names.push(name.clone());
        }
        names.push("customFields".into());
        Some(names)
    }

    /// Every path judging this rule reads (its `FILTER`, its native `matches` or `list`, the
    /// fields it mentions), when it is judged natively now and reads only named paths; `None`
    /// otherwise (its reads then keep maps: see [`Rule::reads`]).
    pub fn read_paths(&self) -> Option<Vec<crate::slots::Path>> {
        let mut paths = self.native_now()?.paths()?;
        paths.extend(self.filter.iter().map(|t| t.path().clone()));
        paths.extend(self.mention_paths.iter().flatten().cloned());
        Some(paths)
    }

    /// `matches` on a member's record, and when it says no, the facts the removal is recorded
    /// with. `last`: no other rule reads this record after, so Rhai may take it rather than a copy.
    pub fn judge_member(
        &self,
        engine: &Engine,
        record: &mut ContactRecord,
        last: bool,
        today: Date,
    ) -> (Result<bool, EvalError>, Facts) {
        if last && !self.reads_in_place() {
            let facts = self.facts(record);
            return (self.call_matches(engine, self.take_record(record), today), facts);
        }
        let verdict = self.matches_on(engine, record.contact(), today);
        let facts = if verdict == Ok(false) { self.facts(record) } else { Facts::default() };
        (verdict, facts)
    }

    /// Which engine judges `matches`: `native` (Rhai for records it defers), or `rhai` and why.
    pub fn engine_name(&self) -> String {
        match &self.native {
            Ok(n) if n.active() && super::native::enabled() => "native".into(),
            Ok(_) if !super::native::enabled() => "rhai ([rules] native = false)".into(),
            Ok(_) => "rhai (a shadow check disagreed with the native verdict)".into(),
            Err(why) => format!("rhai ({why})"),
        }
    }

    /// `matches` through Rhai, whatever engine the rule runs on (the shadow check, the differential test).
    pub fn rhai_matches(&self, engine: &Engine, fields: Dynamic, today: Date) -> Result<bool, EvalError> {
        let verdict = self.call(engine, "matches", fields, today)?;
        verdict.as_bool().map_err(|type_name| EvalError {
            message: format!("matches must return true or false, got {type_name} {verdict}"),
            line: 0,
            col: 0,
        })
    }

    /// What a partitioned rule's `fn list` says of a contact that passed `FILTER`: the name of
    /// its list, or `None` for no list.
    pub fn list_of(&self, engine: &Engine, fields: Dynamic, today: Date) -> Result<Option<String>, EvalError> {
        self.list_on(engine, Contact::Owned(fields), today)
    }

    /// [`Rule::list_of`] on a record the caller keeps (read in place when judged natively).
    pub fn list_of_record(
        &self,
        engine: &Engine,
        record: &ContactRecord,
        today: Date,
    ) -> Result<Option<String>, EvalError> {
        self.list_on(engine, record.contact(), today)
    }

    fn list_on(&self, engine: &Engine, contact: Contact<'_>, today: Date) -> Result<Option<String>, EvalError> {
        if let Some(native) = self.native_now()
            && let Ok(named) = native.list(&contact, today.0)
        {
            return self.shadowed(native, contact, named, |f| self.rhai_list(engine, f, today));
        }
        self.rhai_list(engine, contact.into_reading(self.rhai_reads.as_deref()), today)
    }

    /// `fn list` through Rhai, whatever engine the rule runs on (the shadow check, the differential test).
    pub fn rhai_list(&self, engine: &Engine, fields: Dynamic, today: Date) -> Result<Option<String>, EvalError> {
        let named = self.call(engine, "list", fields, today)?;
        if named.is_unit() {
            return Ok(None);
        }
        match named.clone().into_string() {
            Ok(name) if !name.trim().is_empty() => Ok(Some(name.trim().to_owned())),
            _ => Err(EvalError {
                message: format!(
                    "list must return a list name (a non-empty string) or (), got {} {named}",
                    named.type_name()
                ),
                line: 0,
                col: 0,
            }),
        }
    }

    /// Calls the rule's function `name` on a contact, with the run's frozen today and the rules
    /// `segment` may name as the call's tag.
    fn call(&self, engine: &Engine, name: &str, fields: Dynamic, today: Date) -> Result<Dynamic, EvalError> {
        let segments = (!self.segments.is_empty()).then(|| self.segments.clone());
        let tag = super::engine::CallTag { today, segments };
        let options = CallFnOptions::new().eval_ast(self.imports).rewind_scope(true).with_tag(Dynamic::from(tag));
        // A panic inside the engine or a helper is this contact's evaluation error, never the
        // end of the thread that judges a whole page for every rule.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine.call_fn_with_options::<Dynamic>(options, &mut Scope::new(), &self.ast, name, (fields,))
        }))
        .map_err(|panic| EvalError {
            message: format!("the rule panicked: {}", crate::fault::panic_message(&*panic)),
            line: 0,
            col: 0,
        })?
        .map_err(EvalError::from)
    }
}
