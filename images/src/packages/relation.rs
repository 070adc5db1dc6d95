//! Dependency fields of a binary package (`Depends`, `Pre-Depends`, `Provides`;
//! Debian Policy 7.1): comma-separated relations, each a `|`-separated list of
//! alternatives `name[:archqual] [(op version)]`.

use std::cmp::Ordering;
use std::fmt;

use super::version;
use crate::names;

/// A version relation operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `<<`
    Lt,
    /// `<=` (and the obsolete `<`)
    Le,
    /// `=`
    Eq,
    /// `>=` (and the obsolete `>`)
    Ge,
    /// `>>`
    Gt,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Lt => "<<",
            Op::Le => "<=",
            Op::Eq => "=",
            Op::Ge => ">=",
            Op::Gt => ">>",
        }
    }
}

/// `(op version)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    /// The operator.
    pub op: Op,
    /// The version on the right-hand side.
    pub version: String,
}

impl Constraint {
    /// Whether `v` satisfies this constraint.
    pub fn allows(&self, v: &str) -> bool {
        let o = version::compare(v, &self.version);
        match self.op {
            Op::Lt => o == Ordering::Less,
            Op::Le => o != Ordering::Greater,
            Op::Eq => o == Ordering::Equal,
            Op::Ge => o != Ordering::Less,
            Op::Gt => o == Ordering::Greater,
        }
    }
}

/// One alternative of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alternative {
    /// The package (or virtual package) name, without its architecture qualifier.
    pub name: String,
    /// The version constraint, if any.
    pub constraint: Option<Constraint>,
}

impl Alternative {
    /// Whether package `name` at version `v` satisfies this alternative.
    pub fn allows(&self, v: &str) -> bool {
        self.constraint.as_ref().is_none_or(|c| c.allows(v))
    }
}

impl fmt::Display for Alternative {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.constraint {
            Some(c) => write!(f, "{} ({} {})", self.name, c.op.as_str(), c.version),
            None => f.write_str(&self.name),
        }
    }
}

/// A relation: alternatives, the first satisfiable one wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation(pub Vec<Alternative>);

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" | ")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

/// Parses a `Depends`-style field. Names and versions are checked
/// ([`names::is_debian_package`], [`names::is_debian_version`]): the index is input
/// like any other.
pub fn parse_relations(field: &str) -> Result<Vec<Relation>, String> {
    let mut out = Vec::new();
    for rel in field.split(',') {
        let rel = rel.trim();
        if rel.is_empty() {
            continue;
        }
        let alts = rel
            .split('|')
            .map(parse_alternative)
            .collect::<Result<Vec<_>, _>>()?;
        out.push(Relation(alts));
    }
    Ok(out)
}

/// Parses a `Provides` field: names with an optional `(= version)`.
pub fn parse_provides(field: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let mut out = Vec::new();
    for rel in parse_relations(field)? {
        let [alt] = rel.0.as_slice() else {
            return Err(format!("`{rel}`: alternatives in Provides"));
        };
        let version = match &alt.constraint {
            None => None,
            Some(Constraint {
                op: Op::Eq,
                version,
            }) => Some(version.clone()),
            Some(_) => return Err(format!("`{alt}`: Provides allows only `=`")),
        };
        out.push((alt.name.clone(), version));
    }
    Ok(out)
}

fn parse_alternative(s: &str) -> Result<Alternative, String> {
    // Architecture restrictions `[...]` and build profiles `<...>` belong to source
    // packages; a binary index has none, but they are dropped rather than misread.
    let s = s.trim();
    let s = s.split('[').next().unwrap_or("");
    let after_version = s.find(')').map_or(0, |i| i + 1);
    let s = match s[after_version..].find('<') {
        Some(i) => &s[..after_version + i],
        None => s,
    }
    .trim();
    let (head, constraint) = match s.split_once('(') {
        Some((head, rest)) => {
            let inner = rest
                .strip_suffix(')')
                .ok_or_else(|| format!("`{s}`: unbalanced parenthesis"))?
                .trim();
            let split = inner
                .find(|c: char| !"<>=".contains(c))
                .ok_or_else(|| format!("`{s}`: no version"))?;
            let (op, version) = inner.split_at(split);
            let op = match op {
                "<<" => Op::Lt,
                "<=" | "<" => Op::Le,
                "=" => Op::Eq,
                ">=" | ">" => Op::Ge,
                ">>" => Op::Gt,
                _ => return Err(format!("`{s}`: unknown operator `{op}`")),
            };
            let version = version.trim();
            if !names::is_debian_version(version) {
                return Err(format!("`{s}`: `{version}` is not a Debian version"));
            }
            (
                head.trim(),
                Some(Constraint {
                    op,
                    version: version.to_string(),
                }),
            )
        }
        None => (s, None),
    };
    // `:any`, `:native` or an architecture: the index holds one architecture (plus
    // `all`), so the qualifier does not change the choice.
    let name = head.split(':').next().unwrap_or("");
    if !names::is_debian_package(name) {
        return Err(format!("`{s}`: `{name}` is not a Debian package name"));
    }
    Ok(Alternative {
        name: name.to_string(),
        constraint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_alternatives_constraints_and_qualifiers() {
        let r = parse_relations(
            "libc6 (>= 2.34), python3:any (<< 3.12), debconf (>= 0.5) | debconf-2.0,libx (=1:2.0-1)",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].to_string(), "libc6 (>= 2.34)");
        assert_eq!(r[1].0[0].name, "python3");
        assert_eq!(r[1].to_string(), "python3 (<< 3.12)");
        assert_eq!(r[2].0.len(), 2);
        assert_eq!(r[2].to_string(), "debconf (>= 0.5) | debconf-2.0");
        assert_eq!(
            r[3].0[0].constraint,
            Some(Constraint {
                op: Op::Eq,
                version: "1:2.0-1".into()
            })
        );
        assert!(r[0].0[0].allows("2.36-9"));
        assert!(!r[0].0[0].allows("2.31-13"));
        assert!(r[1].0[0].allows("3.11.2-1+b1"));
        assert!(!r[1].0[0].allows("3.12.0-1"));
        assert!(r[2].0[1].allows("anything"));
    }

    #[test]
    fn provides_and_bad_input() {
        let p = parse_provides("python3-foo (= 1.0), mail-transport-agent")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p,
            vec![
                ("python3-foo".to_string(), Some("1.0".to_string())),
                ("mail-transport-agent".to_string(), None)
            ]
        );
        assert!(parse_provides("a | b").is_err());
        assert!(parse_relations("libc6 (>= 2.34").is_err());
        assert!(parse_relations("libc6 (~ 2.34)").is_err());
        assert!(parse_relations("--option").is_err());
        assert!(parse_relations("libc6 (>= --x)").is_err());
        assert_eq!(parse_relations(" , ").map(|r| r.len()), Ok(0));
        let r = parse_relations("foo [amd64] <!nocheck>, bar (<< 2) <stage1>")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r[0].to_string(), "foo");
        assert_eq!(r[1].to_string(), "bar (<< 2)");
    }
}
