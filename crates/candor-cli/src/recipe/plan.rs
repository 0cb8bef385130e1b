//! Reading a recipe into a flat, validated list of stages with their inputs resolved.
//! Everything a stage needs is checked here, before anything trains: kinds, references to
//! earlier stages, config files, and each stage's typed config (unknown keys included).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use serde_yaml::{Mapping, Value};

use crate::registry::{self, Source, StageKind};

/// One stage, ready to run.
#[derive(Clone, Debug)]
pub struct Planned {
    /// `sft`, or `rlhf-2/ppo` inside a repeated group.
    pub id: String,
    /// The name written in the recipe (for `--from` / `--only` / `--set name.key=...`).
    pub name: String,
    pub kind: &'static StageKind,
    pub dir: PathBuf,
    /// (role, index of the producing stage).
    pub inputs: Vec<(String, usize)>,
    /// The stage's config with inputs and overrides applied.
    pub config: Value,
    /// Names the stage in errors: `configs/recipes/tiny.yaml: stage sft`.
    pub origin: String,
}

pub struct Recipe {
    pub path: PathBuf,
    pub out: PathBuf,
    pub device: String,
    pub stages: Vec<Planned>,
}

fn s(v: &Value) -> Option<&str> {
    v.as_str()
}

fn key<'a>(m: &'a Mapping, k: &str) -> Option<&'a Value> {
    m.get(Value::String(k.to_string()))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Parse, resolve and check a recipe.
pub fn load_recipe(path: &Path, sets: &[String]) -> Result<Recipe> {
    let origin = path.display().to_string();
    let mut root = candor_core::config::read_yaml(path)?;
    // recipe-level overrides (`out=`, `seed=`, `device=`) apply to the recipe; `NAME.key=`
    // go to the stage called NAME
    let mut stage_sets: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut top_sets = vec![];
    for ov in sets {
        let (k, _) = ov
            .split_once('=')
            .ok_or_else(|| anyhow!("--set `{ov}`: expected key=value"))?;
        match k.split_once('.') {
            Some((stage, rest)) => stage_sets
                .entry(stage.to_string())
                .or_default()
                .push(format!("{rest}={}", &ov[k.len() + 1..])),
            None => top_sets.push(ov.clone()),
        }
    }
    candor_core::config::apply_overrides(&mut root, &top_sets, &origin)?;
    let m = root
        .as_mapping()
        .ok_or_else(|| anyhow!("{origin}: a recipe is a mapping with `out` and `stages`"))?;
    for (k, _) in m {
        let k = s(k).unwrap_or("?");
        if !matches!(k, "out" | "seed" | "device" | "stages" | "description") {
            bail!("{origin}: unknown key `{k}` (expected out, seed, device, stages, description)");
        }
    }
    let out = key(m, "out")
        .and_then(s)
        .ok_or_else(|| anyhow!("{origin}: `out` (the run directory) is missing"))?;
    let seed = match key(m, "seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| anyhow!("{origin}: `seed` must be a non-negative integer"))?,
        ),
    };
    let device = key(m, "device").and_then(s).unwrap_or("auto").to_string();
    let list = key(m, "stages")
        .and_then(Value::as_sequence)
        .ok_or_else(|| anyhow!("{origin}: `stages` must be a list"))?;
    if list.is_empty() {
        bail!("{origin}: `stages` is empty");
    }
    let mut b = Builder {
        origin: origin.clone(),
        out: PathBuf::from(out),
        seed,
        stage_sets,
        stages: vec![],
        by_name: BTreeMap::new(),
    };
    // names defined anywhere (to tell "comes later" from "does not exist")
    let mut all_names: Vec<(String, Vec<String>)> = vec![];
    for entry in list {
        let em = entry
            .as_mapping()
            .ok_or_else(|| anyhow!("{origin}: each stage is a mapping"))?;
        if let Some(g) = key(em, "stages").and_then(Value::as_sequence) {
            for st in g {
                if let Some(n) = st.as_mapping().and_then(|m| key(m, "name")).and_then(s) {
                    all_names.push((n.to_string(), refs_of(st)));
                }
            }
        } else if let Some(n) = key(em, "name").and_then(s) {
            all_names.push((n.to_string(), refs_of(entry)));
        }
    }
    for entry in list {
        let em = entry.as_mapping().unwrap();
        if key(em, "repeat").is_some() {
            b.group(em, &all_names)?;
        } else {
            b.stage(entry, None, &BTreeMap::new(), &all_names)?;
        }
    }
    for name in b.stage_sets.keys() {
        if !b.stages.iter().any(|p| &p.name == name) {
            bail!("--set {name}.…: no stage named `{name}` in {origin}");
        }
    }
    Ok(Recipe {
        path: path.to_path_buf(),
        out: b.out,
        device,
        stages: b.stages,
    })
}

/// The stage names a stage entry refers to (for cycle reports).
fn refs_of(v: &Value) -> Vec<String> {
    let Some(m) = v.as_mapping() else {
        return vec![];
    };
    let Some(kind) = key(m, "kind").and_then(s).and_then(registry::find) else {
        return vec![];
    };
    kind.roles
        .iter()
        .filter_map(|r| key(m, r.role).and_then(s).map(String::from))
        .collect()
}

struct Builder {
    origin: String,
    out: PathBuf,
    seed: Option<u64>,
    stage_sets: BTreeMap<String, Vec<String>>,
    stages: Vec<Planned>,
    /// Latest stage of each name (a name in a repeated group means its latest round).
    by_name: BTreeMap<String, usize>,
}

impl Builder {
    fn group(&mut self, g: &Mapping, all: &[(String, Vec<String>)]) -> Result<()> {
        let origin = self.origin.clone();
        let name = key(g, "name")
            .and_then(s)
            .ok_or_else(|| anyhow!("{origin}: a `repeat` group needs a `name`"))?
            .to_string();
        let at = format!("{origin}: group `{name}`");
        for (k, _) in g {
            let k = s(k).unwrap_or("?");
            if !matches!(k, "repeat" | "name" | "carry" | "next" | "stages") {
                bail!("{at}: unknown key `{k}` (expected repeat, name, carry, next, stages)");
            }
        }
        let n = key(g, "repeat")
            .and_then(Value::as_u64)
            .filter(|&n| n >= 1)
            .ok_or_else(|| anyhow!("{at}: `repeat` must be a positive integer"))?;
        let read_map = |k: &str| -> Result<BTreeMap<String, String>> {
            let mut out = BTreeMap::new();
            if let Some(v) = key(g, k) {
                let m = v
                    .as_mapping()
                    .ok_or_else(|| anyhow!("{at}: `{k}` must map names to stage names"))?;
                for (a, b) in m {
                    out.insert(
                        s(a).ok_or_else(|| anyhow!("{at}: `{k}` keys must be names"))?
                            .to_string(),
                        s(b).ok_or_else(|| anyhow!("{at}: `{k}` values must be stage names"))?
                            .to_string(),
                    );
                }
            }
            Ok(out)
        };
        let carry = read_map("carry")?;
        let next = read_map("next")?;
        for k in next.keys() {
            if !carry.contains_key(k) {
                bail!("{at}: next.{k} has no matching carry.{k}");
            }
        }
        let stages = key(g, "stages")
            .and_then(Value::as_sequence)
            .ok_or_else(|| anyhow!("{at}: `stages` must be a list"))?;
        let inner: Vec<String> = stages
            .iter()
            .filter_map(|st| {
                st.as_mapping()
                    .and_then(|m| key(m, "name"))
                    .and_then(s)
                    .map(String::from)
            })
            .collect();
        for (var, target) in &next {
            if !inner.contains(target) {
                bail!("{at}: next.{var}: `{target}` is not a stage of this group");
            }
        }
        // round 1 binds carry variables to stages before the group
        let mut bound: BTreeMap<String, usize> = BTreeMap::new();
        for (var, target) in &carry {
            let i = *self
                .by_name
                .get(target)
                .ok_or_else(|| anyhow!("{at}: carry.{var}: no earlier stage named `{target}`"))?;
            bound.insert(var.clone(), i);
        }
        for round in 1..=n {
            let prefix = format!("{name}-{round}");
            let mut this_round: BTreeMap<String, usize> = BTreeMap::new();
            for st in stages {
                let i = self.stage(
                    st,
                    Some(&prefix),
                    &bound
                        .iter()
                        .chain(this_round.iter())
                        .map(|(k, v)| (k.clone(), *v))
                        .collect(),
                    all,
                )?;
                this_round.insert(self.stages[i].name.clone(), i);
            }
            for (var, target) in &next {
                bound.insert(var.clone(), this_round[target]);
            }
        }
        Ok(())
    }

    /// Add one stage; `scope` maps names visible first (a round's stages and carried names).
    fn stage(
        &mut self,
        v: &Value,
        prefix: Option<&str>,
        scope: &BTreeMap<String, usize>,
        all: &[(String, Vec<String>)],
    ) -> Result<usize> {
        let origin = &self.origin;
        let m = v
            .as_mapping()
            .ok_or_else(|| anyhow!("{origin}: each stage is a mapping"))?;
        let name = key(m, "name")
            .and_then(s)
            .ok_or_else(|| anyhow!("{origin}: a stage without a `name`"))?
            .to_string();
        let at = format!("{origin}: stage `{name}`");
        if !valid_name(&name) {
            bail!("{at}: names use letters, digits, '-' and '_'");
        }
        let id = match prefix {
            Some(p) => format!("{p}/{name}"),
            None => name.clone(),
        };
        if prefix.is_none() && self.by_name.contains_key(&name)
            || self.stages.iter().any(|p| p.id == id)
        {
            bail!("{at}: another stage has this name");
        }
        let kinds = registry::names();
        let kind_s = key(m, "kind")
            .and_then(s)
            .ok_or_else(|| anyhow!("{at}: `kind` is missing (one of {kinds})"))?;
        let kind = registry::find(kind_s)
            .ok_or_else(|| anyhow!("{at}: unknown kind `{kind_s}` (expected one of {kinds})"))?;
        let roles = kind.roles;
        // the config: a file or an inline mapping (config kinds), or the stage's own options
        let mut config = if kind.config_file {
            match key(m, "config") {
                Some(Value::String(p)) => {
                    let p = Path::new(p);
                    if !p.is_file() {
                        bail!("{at}: config file {} does not exist", p.display());
                    }
                    candor_core::config::read_yaml(p).map_err(|e| anyhow!("{at}: {e}"))?
                }
                Some(Value::Mapping(inline)) => Value::Mapping(inline.clone()),
                Some(_) => bail!("{at}: `config` must be a file path or a mapping"),
                None => bail!(
                    "{at}: `config` is missing (a {} stage needs a config file or mapping)",
                    kind.name
                ),
            }
        } else {
            let mut opts = Mapping::new();
            for (k, val) in m {
                let ks = s(k).unwrap_or("");
                if !matches!(ks, "name" | "kind" | "set") && !roles.iter().any(|r| r.role == ks) {
                    opts.insert(k.clone(), val.clone());
                }
            }
            Value::Mapping(opts)
        };
        for (k, _) in m {
            let ks = s(k).unwrap_or("?");
            let known = matches!(ks, "name" | "kind" | "set")
                || roles.iter().any(|r| r.role == ks)
                || (kind.config_file && ks == "config");
            if kind.config_file && !known {
                bail!(
                    "{at}: unknown key `{ks}` for a {} stage (expected name, kind, config, set{})",
                    kind.name,
                    roles
                        .iter()
                        .map(|r| format!(", {}", r.role))
                        .collect::<String>()
                );
            }
        }
        // the recipe's seed, then the stage's own overrides
        if let (Some(seed), true) = (self.seed, kind.seeded) {
            candor_core::config::set_path(&mut config, "seed", Value::Number(seed.into()))
                .map_err(|e| anyhow!("{at}: {e}"))?;
        }
        let mut sets: Vec<String> = match key(m, "set") {
            None => vec![],
            Some(Value::Sequence(xs)) => xs
                .iter()
                .map(|x| {
                    s(x).map(String::from)
                        .ok_or_else(|| anyhow!("{at}: `set` items are key=value strings"))
                })
                .collect::<Result<_>>()?,
            Some(Value::Mapping(xm)) => xm
                .iter()
                .map(|(k, v)| {
                    Ok(format!(
                        "{}={}",
                        s(k).ok_or_else(|| anyhow!("{at}: `set` keys are strings"))?,
                        serde_yaml::to_string(v)?.trim()
                    ))
                })
                .collect::<Result<_>>()?,
            Some(_) => bail!("{at}: `set` is a list of key=value or a mapping"),
        };
        sets.extend(self.stage_sets.get(&name).cloned().unwrap_or_default());
        candor_core::config::apply_overrides(&mut config, &sets, &at)?;
        // inputs: names of earlier stages
        let mut inputs = vec![];
        for input in roles {
            let role = input.role;
            let Some(refv) = key(m, role) else {
                if input.required {
                    bail!("{at}: `{role}` is missing (the name of an earlier stage)");
                }
                continue;
            };
            let r = s(refv).ok_or_else(|| anyhow!("{at}: `{role}` must name an earlier stage"))?;
            let i = match scope.get(r).or_else(|| self.by_name.get(r)) {
                Some(&i) => i,
                None if r == name => {
                    bail!("{at}: `{role}: {r}` refers to the stage itself (a cycle)")
                }
                None if all.iter().any(|(n, _)| n == r) => {
                    let back = all
                        .iter()
                        .find(|(n, _)| n == r)
                        .map(|(_, refs)| refs.contains(&name))
                        .unwrap_or(false);
                    if back {
                        bail!("{at}: `{role}: {r}` and stage `{r}` refer to each other (a cycle)");
                    }
                    bail!("{at}: `{role}: {r}` refers to a stage that comes later; inputs must come from earlier stages")
                }
                None => bail!("{at}: `{role}: {r}`: no stage named `{r}`"),
            };
            let producer = &self.stages[i];
            let path = match producer.kind.output_file {
                Some(f) => producer.dir.join(f),
                None => producer.dir.clone(),
            };
            match input.from {
                Source::Model if !producer.kind.makes_model => bail!(
                    "{at}: `{role}: {r}` must name a stage that makes a model, `{r}` is a {} stage",
                    producer.kind.name
                ),
                Source::Data(from) if producer.kind.makes_model => {
                    bail!("{at}: `{role}: {r}` must name a {from} stage")
                }
                _ => {}
            }
            let pv = Value::String(path.display().to_string());
            let pv = if input.list {
                Value::Sequence(vec![pv])
            } else {
                pv
            };
            candor_core::config::set_path(&mut config, input.key, pv)
                .map_err(|e| anyhow!("{at}: {e}"))?;
            inputs.push((role.to_string(), i));
        }
        // an existing checkpoint is where it is (resolved now, so a missing one fails before
        // anything trains); everything else writes under the run directory
        let dir = match kind.locate {
            Some(locate) => locate(&config, &at)?,
            None => self.out.join(&id),
        };
        let planned = Planned {
            id,
            name: name.clone(),
            kind,
            dir,
            inputs,
            config,
            origin: at,
        };
        super::exec::check_config(&planned, &self.out)?;
        self.stages.push(planned);
        let i = self.stages.len() - 1;
        self.by_name.insert(name, i);
        Ok(i)
    }
}
