//! Native evaluation of `matches` (or of a partitioned rule's `fn list`): the shapes
//! [`derive`](super::derive) reads, compiled once into a small tree and judged on the parsed record
//! without a Rhai call.
//!
//! What compiles: a body of `let` statements, `if … { return false; }` guards and one final
//! expression (or `return`), built from the contact's fields (`contact.a.b`, `….get("x")`),
//! `let` names, constants, `??`, `==` `!=` `<` `<=` `>` `>=`, `!`, `&&`, `||`, `+` on two texts,
//! and `days_since`, `days_until`, `date`, `today`. Anything else keeps the Rhai path, unchanged.
//!
//! **The same verdict, error-ness included, by construction where it matters.** A record is judged
//! natively only along paths whose Rhai meaning is plain: numbers with numbers (integers and
//! decimals mixed), text with text, dates with dates, booleans, `==`/`!=` across simple types
//! (always false/true in Rhai). Every path where Rhai would raise an error, or whose meaning is
//! less plain (a missing property, `()` compared with `<`, a date that does not parse, a map or an
//! array), is [`Defer`]red: that record goes to Rhai, which gives the verdict or the error with its
//! message. So every error message is Rhai's own. The differential test (`tests/native.rs`) checks
//! the verdicts on generated records; in production a sampled shadow check (see
//! [`Native::shadow_due`]) compares both engines, and a disagreement turns the rule back to Rhai.

use std::cmp::Ordering;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};

use chrono::NaiveDate;
use chrono_tz::Tz;
use rhai::{Expr, FnCallExpr, ImmutableString, Stmt};

use crate::slots::{Fields, Leaf, Lookup, Path, Text};

/// `[rules] native`: whether recognised rules are judged natively in this process (set from the
/// config at start and on reload; `false` runs every rule on Rhai, the escape hatch).
static ENABLED: AtomicBool = AtomicBool::new(true);

pub fn set_enabled(on: bool) {
    ENABLED.store(on, AtomicOrdering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(AtomicOrdering::Relaxed)
}

/// A record the native predicate leaves to Rhai (an error there, or a path it does not judge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defer;

/// The most `let` names a native `matches` may bind (they live in a fixed array per call).
const MAX_LOCALS: usize = 8;

/// One record in this many is judged by both engines in production (the shadow check).
pub const SHADOW_EVERY: u64 = 1000;

/// Which function a [`Native`] stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    /// `fn matches(contact)`: true or false.
    Matches,
    /// A partitioned rule's `fn list(contact)`: a list name, or `()` for no list.
    List,
}

/// A compiled `matches` or `list`.
#[derive(Debug)]
pub struct Native {
    pub function: Function,
    steps: Vec<Step>,
    result: Node,
    tz: Tz,
    /// Records judged natively so far by each thread (the shadow check samples on it): a count
    /// every page thread shared was one cache line they all wrote, once a record.
    judged: thread_local::ThreadLocal<std::cell::Cell<u64>>,
    /// A shadow check found a disagreement: from then on this rule runs on Rhai.
    retired: AtomicBool,
    /// When it was retired.
    retired_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// The `native-wrong` test fault: every verdict is turned round (debug builds, tests only).
    wrong: bool,
}

#[derive(Debug)]
enum Step {
    Let(usize, Node),
    /// `if COND { return false; }`
    Guard(Node),
}

#[derive(Debug)]
enum Node {
    Lit(Val<'static>),
    /// A chain of properties and `get`s from the contact, and its path (`None`: the contact itself).
    Field(Vec<Seg>, Option<Path>),
    Local(usize),
    Coalesce(Vec<Node>),
    Cmp(Op, Box<Node>, Box<Node>),
    /// `+`, judged natively only on two texts (their concatenation).
    Concat(Box<Node>, Box<Node>),
    Not(Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
    DaysSince(Box<Node>),
    DaysUntil(Box<Node>),
    Date(Box<Node>),
    Today,
    /// A body's last statement `if c { a } else { b }`: `()` without `else`, as in Rhai.
    If(Box<Node>, Box<Node>, Option<Box<Node>>),
}

#[derive(Debug)]
enum Seg {
    /// `.name`: a missing key is a Rhai error.
    Prop(ImmutableString),
    /// `.get("name")`: a missing key is `()`.
    Get(ImmutableString),
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A value as the native predicate sees it: text borrowed from the record or the rule where it
/// can be; a map, an array, anything else is `Other`, never judged natively.
type Val<'a> = Leaf<'a>;

/// Compiles `matches` from the whole script as [`rhai::Engine::compact_script`] writes it, or
/// says why it stays on Rhai.
pub fn compile(rule: &str, compact: &str, tz: Tz) -> Result<Native, String> {
    let function = if compact.contains("fn list(") { Function::List } else { Function::Matches };
    let name = match function {
        Function::Matches => "matches",
        Function::List => "list",
    };
    let (param, body) = super::derive::fn_body(compact, name)?;
    // The body alone, parsed for its shape only (never run): an engine with nothing registered
    // and no optimisation, so the tree is the text as written.
    let mut engine = rhai::Engine::new_raw();
    engine.set_optimization_level(rhai::OptimizationLevel::None);
    let ast = engine.compile(body).map_err(|e| format!("matches does not parse alone: {e}"))?;
    let mut compiler = Compiler { param, locals: Vec::new() };
    let statements = ast.statements();
    let Some((last, before)) = statements.split_last() else { return Err(format!("{name} is empty")) };
    let mut steps = Vec::new();
    for statement in before {
        steps.push(compiler.step(statement)?);
    }
    let result = compiler.tail(last).map_err(|()| format!("{name} does not end with an expression"))?;
    let wrong = crate::fault::native_wrong(rule);
    Ok(Native {
        function,
        steps,
        result,
        tz,
        judged: thread_local::ThreadLocal::new(),
        retired: AtomicBool::new(false),
        retired_at: Default::default(),
        wrong,
    })
}

struct Compiler<'a> {
    param: &'a str,
    /// `let` names in order; a name bound again gets a new slot (Rhai's shadowing).
    locals: Vec<String>,
}

impl Compiler<'_> {
    fn step(&mut self, statement: &Stmt) -> Result<Step, String> {
        match statement {
            Stmt::Var(var, ..) => {
                let (ident, value, _) = &**var;
                let node = self.expr(value)?;
                if self.locals.len() == MAX_LOCALS {
                    return Err(format!("matches binds more than {MAX_LOCALS} names"));
                }
                if ident.name.as_str() == self.param {
                    return Err(format!("matches rebinds `{}`", self.param));
                }
                self.locals.push(ident.name.to_string());
                Ok(Step::Let(self.locals.len() - 1, node))
            }
            Stmt::If(flow, _) => {
                let returns_false = matches!(
                    flow.body.statements(),
                    [Stmt::Return(Some(value), ..)] if matches!(**value, Expr::BoolConstant(false, _))
                );
                if !returns_false || !flow.branch.statements().is_empty() {
                    return Err("matches has an `if` that does not only `return false`".into());
                }
                Ok(Step::Guard(self.expr(&flow.expr)?))
            }
            _ => Err("matches has a statement that is not a `let` or a guard".into()),
        }
    }

    /// The body's last statement: an expression, a `return` of one, or an `if` whose branches are
    /// each one such statement (`else if` included).
    fn tail(&self, statement: &Stmt) -> Result<Node, ()> {
        let one = |block: &[Stmt]| match block {
            [statement] => self.tail(statement),
            _ => Err(()),
        };
        match statement {
            Stmt::Expr(e) | Stmt::Return(Some(e), ..) => self.expr(e).map_err(|_| ()),
            Stmt::FnCall(call, _) => self.call(call).map_err(|_| ()),
            Stmt::If(flow, _) => {
                let condition = self.expr(&flow.expr).map_err(|_| ())?;
                let otherwise = match flow.branch.statements() {
                    [] => None,
                    branch => Some(Box::new(one(branch)?)),
                };
                Ok(Node::If(Box::new(condition), Box::new(one(flow.body.statements())?), otherwise))
            }
            _ => Err(()),
        }
    }

    fn expr(&self, e: &Expr) -> Result<Node, String> {
        Ok(match e {
            Expr::BoolConstant(b, _) => Node::Lit(Val::Bool(*b)),
            Expr::IntegerConstant(i, _) => Node::Lit(Val::Int(*i)),
            Expr::FloatConstant(f, _) => Node::Lit(Val::Float(**f)),
            Expr::StringConstant(s, _) => Node::Lit(Val::Str(Text::Shared(s.clone()))),
            Expr::Unit(_) => Node::Lit(Val::Unit),
            Expr::Variable(var, ..) => {
                let name = var.1.as_str();
                if !var.2.is_empty() {
                    return Err(format!("a qualified name {name}"));
                }
                if name == self.param {
                    Node::Field(Vec::new(), None)
                } else {
                    let slot = self.locals.iter().rposition(|l| l == name).ok_or(format!("an unknown name {name}"))?;
                    Node::Local(slot)
                }
            }
            Expr::Dot(chain, flags, _) => {
                if flags.contains(rhai::ASTFlags::NEGATED) {
                    return Err("`?.`".into());
                }
                let Expr::Variable(var, ..) = &chain.lhs else { return Err("a property of a non-name".into()) };
                if var.1.as_str() != self.param {
                    return Err(format!("a property of `{}`, not of the contact", var.1));
                }
                let mut segs = Vec::new();
                segments(&chain.rhs, &mut segs)?;
                let names: Vec<&str> = segs.iter().map(Seg::name).collect();
                let path = Path::new(&names);
                Node::Field(segs, Some(path))
            }
            Expr::FnCall(call, _) => self.call(call)?,
            Expr::And(parts, _) => Node::And(parts.iter().map(|p| self.expr(p)).collect::<Result<_, _>>()?),
            Expr::Or(parts, _) => Node::Or(parts.iter().map(|p| self.expr(p)).collect::<Result<_, _>>()?),
            Expr::Coalesce(parts, _) => Node::Coalesce(parts.iter().map(|p| self.expr(p)).collect::<Result<_, _>>()?),
            _ => return Err("an expression segsync does not evaluate natively".into()),
        })
    }

    fn call(&self, call: &FnCallExpr) -> Result<Node, String> {
        if call.is_qualified() {
            return Err(format!("a call of {}", call.name));
        }
        let args = &call.args;
        let arg = |i: usize| self.expr(&args[i]).map(Box::new);
        let op = match (call.name.as_str(), args.len()) {
            ("==", 2) => Some(Op::Eq),
            ("!=", 2) => Some(Op::Ne),
            ("<", 2) => Some(Op::Lt),
            ("<=", 2) => Some(Op::Le),
            (">", 2) => Some(Op::Gt),
            (">=", 2) => Some(Op::Ge),
            _ => None,
        };
        Ok(match (call.name.as_str(), args.len(), op) {
            (_, _, Some(op)) if call.is_operator_call() => Node::Cmp(op, arg(0)?, arg(1)?),
            ("!", 1, _) if call.is_operator_call() => Node::Not(arg(0)?),
            ("+", 2, _) if call.is_operator_call() => Node::Concat(arg(0)?, arg(1)?),
            ("days_since", 1, _) => Node::DaysSince(arg(0)?),
            ("days_until", 1, _) => Node::DaysUntil(arg(0)?),
            ("date", 1, _) => Node::Date(arg(0)?),
            ("today", 0, _) => Node::Today,
            (name, ..) => return Err(format!("a call of {name}()")),
        })
    }
}

/// The properties and `get`s after the contact: `.a.b.get("c")`.
fn segments(e: &Expr, out: &mut Vec<Seg>) -> Result<(), String> {
    match e {
        Expr::Property(property, _) => out.push(Seg::Prop(property.2.clone())),
        Expr::MethodCall(call, _) => match (call.name.as_str(), call.args.as_slice()) {
            ("get", [Expr::StringConstant(key, _)]) if !call.is_qualified() => out.push(Seg::Get(key.clone())),
            (name, _) => return Err(format!("a method call {name}()")),
        },
        Expr::Dot(chain, flags, _) if !flags.contains(rhai::ASTFlags::NEGATED) => {
            segments(&chain.lhs, out)?;
            segments(&chain.rhs, out)?;
        }
        _ => return Err("a property chain segsync does not evaluate natively".into()),
    }
    Ok(())
}

impl Seg {
    fn name(&self) -> &str {
        match self {
            Seg::Prop(name) | Seg::Get(name) => name.as_str(),
        }
    }
}

/// The value at `path` (`segs`) of `contact`. A missing property, or a property of something that
/// is not a map, is a Rhai error: deferred. A missing key that `get` reads last is `()`; one that
/// something is read from after it is `()` read from: an error, deferred.
fn field<'a>(contact: &'a (impl Fields + ?Sized), segs: &[Seg], path: Option<&Path>) -> Result<Val<'a>, Defer> {
    let Some(path) = path else { return Ok(contact.whole()) };
    match contact.lookup(path) {
        Lookup::Value(leaf) => Ok(leaf),
        Lookup::Absent(at) if at + 1 == segs.len() && matches!(segs[at], Seg::Get(_)) => Ok(Val::Unit),
        Lookup::Absent(_) | Lookup::NotMap => Err(Defer),
    }
}

/// A comparison, where its Rhai meaning is plain; otherwise deferred.
fn compare(op: Op, a: &Val<'_>, b: &Val<'_>) -> Result<bool, Defer> {
    use Leaf::*;
    let order = match (a, b) {
        (Int(x), Int(y)) => x.partial_cmp(y),
        (Float(x), Float(y)) => x.partial_cmp(y),
        (Int(x), Float(y)) => (*x as f64).partial_cmp(y),
        (Float(x), Int(y)) => x.partial_cmp(&(*y as f64)),
        (Str(x), Str(y)) => Some(x.as_str().cmp(y.as_str())),
        (Date(x), Date(y)) => Some(x.cmp(y)),
        (Bool(x), Bool(y)) => Some(x.cmp(y)),
        _ => None,
    };
    let equal_or_defer = |a: &Val<'_>, b: &Val<'_>| match (a, b, order) {
        (_, _, Some(o)) => Ok(o == Ordering::Equal),
        (Unit, Unit, _) => Ok(true),
        // Values of two different simple types are never equal in Rhai.
        (Other, _, _) | (_, Other, _) => Err(Defer),
        _ => Ok(false),
    };
    Ok(match op {
        Op::Eq => equal_or_defer(a, b)?,
        Op::Ne => !equal_or_defer(a, b)?,
        Op::Lt => order.ok_or(Defer)? == Ordering::Less,
        Op::Le => order.ok_or(Defer)? != Ordering::Greater,
        Op::Gt => order.ok_or(Defer)? == Ordering::Greater,
        Op::Ge => order.ok_or(Defer)? != Ordering::Less,
    })
}

/// Where a native body ended: a guard returned `false`, or the final expression's value.
enum End<'a> {
    GuardFalse,
    Value(Val<'a>),
}

impl Native {
    /// `matches` on `contact`, natively: the verdict, or [`Defer`] when Rhai must judge it.
    pub fn judge(&self, contact: &(impl Fields + ?Sized), today: NaiveDate) -> Result<bool, Defer> {
        if self.function != Function::Matches {
            return Err(Defer);
        }
        match self.run(contact, today)? {
            End::GuardFalse => Ok(self.wrong),
            End::Value(Val::Bool(b)) => Ok(b != self.wrong),
            End::Value(_) => Err(Defer),
        }
    }

    /// `fn list` on `contact`, natively: the list's name (trimmed, as Rhai's path trims it), or
    /// `None` for `()`; [`Defer`] for anything Rhai would refuse or judge otherwise.
    pub fn list(&self, contact: &(impl Fields + ?Sized), today: NaiveDate) -> Result<Option<String>, Defer> {
        if self.function != Function::List {
            return Err(Defer);
        }
        let named = match self.run(contact, today)? {
            End::Value(Val::Unit) => None,
            End::Value(Val::Str(s)) if !s.as_str().trim().is_empty() => Some(s.as_str().trim().to_owned()),
            _ => return Err(Defer),
        };
        // The `native-wrong` test fault: a contact its list would hold is put in none.
        Ok(named.filter(|_| !self.wrong))
    }

    /// The contact's top-level fields this body reads; `None` when it reads the contact itself.
    pub fn top_fields(&self) -> Option<Vec<String>> {
        Some(self.paths()?.iter().filter_map(|p| p.names().first().cloned()).collect())
    }

    /// The paths this body reads; `None` when it reads the contact itself.
    pub fn paths(&self) -> Option<Vec<Path>> {
        fn visit(node: &Node, out: &mut Vec<Path>) -> bool {
            match node {
                Node::Field(_, Some(path)) => {
                    out.push(path.clone());
                    true
                }
                Node::Field(_, None) => false,
                Node::Lit(_) | Node::Local(_) | Node::Today => true,
                Node::Coalesce(parts) | Node::And(parts) | Node::Or(parts) => parts.iter().all(|p| visit(p, out)),
                Node::Cmp(_, a, b) | Node::Concat(a, b) => visit(a, out) && visit(b, out),
                Node::Not(a) | Node::DaysSince(a) | Node::DaysUntil(a) | Node::Date(a) => visit(a, out),
                Node::If(c, a, b) => visit(c, out) && visit(a, out) && b.as_deref().is_none_or(|b| visit(b, out)),
            }
        }
        let mut out = Vec::new();
        let steps = self.steps.iter().map(|s| match s {
            Step::Let(_, node) | Step::Guard(node) => node,
        });
        steps.chain([&self.result]).all(|node| visit(node, &mut out)).then_some(out)
    }

    fn run<'a>(&'a self, contact: &'a (impl Fields + ?Sized), today: NaiveDate) -> Result<End<'a>, Defer> {
        let mut locals: [Val<'a>; MAX_LOCALS] = Default::default();
        for step in &self.steps {
            match step {
                Step::Let(slot, node) => locals[*slot] = self.value(node, contact, &locals, today)?,
                Step::Guard(node) => match self.value(node, contact, &locals, today)? {
                    Val::Bool(true) => return Ok(End::GuardFalse),
                    Val::Bool(false) => {}
                    _ => return Err(Defer),
                },
            }
        }
        Ok(End::Value(self.value(&self.result, contact, &locals, today)?))
    }

    fn value<'a>(
        &'a self,
        node: &'a Node,
        contact: &'a (impl Fields + ?Sized),
        locals: &[Val<'a>],
        today: NaiveDate,
    ) -> Result<Val<'a>, Defer> {
        let value = |n: &'a Node| self.value(n, contact, locals, today);
        let truth = |n: &'a Node| match value(n)? {
            Val::Bool(b) => Ok(b),
            _ => Err(Defer),
        };
        Ok(match node {
            Node::Lit(v) => v.borrowed(),
            Node::Field(segs, path) => field(contact, segs, path.as_ref())?,
            Node::Local(slot) => locals[*slot].clone(),
            Node::Coalesce(parts) => {
                let (last, first) = parts.split_last().ok_or(Defer)?;
                for part in first {
                    let v = value(part)?;
                    if !matches!(v, Val::Unit) {
                        return Ok(v);
                    }
                }
                value(last)?
            }
            Node::Cmp(op, a, b) => Val::Bool(compare(*op, &value(a)?, &value(b)?)?),
            Node::Concat(a, b) => match (value(a)?, value(b)?) {
                (Val::Str(x), Val::Str(y)) => {
                    let (x, y) = (x.as_str(), y.as_str());
                    let mut joined = String::with_capacity(x.len() + y.len());
                    joined.push_str(x);
                    joined.push_str(y);
                    Val::Str(Text::Shared(joined.into()))
                }
                _ => return Err(Defer),
            },
            Node::Not(a) => Val::Bool(!truth(a)?),
            Node::And(parts) => {
                for part in parts {
                    if !truth(part)? {
                        return Ok(Val::Bool(false));
                    }
                }
                Val::Bool(true)
            }
            Node::Or(parts) => {
                for part in parts {
                    if truth(part)? {
                        return Ok(Val::Bool(true));
                    }
                }
                Val::Bool(false)
            }
            Node::DaysSince(a) => Val::Int((today - self.date(value(a)?)?).num_days()),
            Node::DaysUntil(a) => Val::Int((self.date(value(a)?)? - today).num_days()),
            Node::Date(a) => match value(a)? {
                Val::Str(s) => Val::Date(super::engine::parse_date(s.as_str(), self.tz).map_err(|_| Defer)?),
                _ => return Err(Defer),
            },
            Node::Today => Val::Date(today),
            Node::If(condition, then, otherwise) => match (truth(condition)?, otherwise) {
                (true, _) => value(then)?,
                (false, Some(otherwise)) => value(otherwise)?,
                (false, None) => Val::Unit,
            },
        })
    }

    /// What `days_since`/`days_until` read: a date, or text that parses as one.
    fn date(&self, v: Val<'_>) -> Result<NaiveDate, Defer> {
        match v {
            Val::Date(d) => Ok(d),
            Val::Str(s) => super::engine::parse_date(s.as_str(), self.tz).map_err(|_| Defer),
            _ => Err(Defer),
        }
    }

    /// Whether this natively judged record is also to be judged by Rhai (one in [`SHADOW_EVERY`]
    /// of those each thread judges for this rule, each thread's first included).
    pub fn shadow_due(&self) -> bool {
        let judged = self.judged.get_or_default();
        let n = judged.get();
        judged.set(n + 1);
        n.is_multiple_of(SHADOW_EVERY)
    }

    /// Whether the rule still runs natively (no shadow check has disagreed).
    pub fn active(&self) -> bool {
        !self.retired.load(AtomicOrdering::Relaxed)
    }

    /// A shadow check disagreed: Rhai judges this rule from now on. True the first time.
    pub fn retire(&self) -> bool {
        let first = !self.retired.swap(true, AtomicOrdering::Relaxed);
        if first {
            *self.retired_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        }
        first
    }

    /// Whether it was retired after `t` (a run that began before then used native verdicts).
    pub fn retired_after(&self, t: std::time::Instant) -> bool {
        self.retired_at.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|at| at >= t)
    }
}
