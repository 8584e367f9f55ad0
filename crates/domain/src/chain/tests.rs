//! The chain against an independent model of SQL Server: a simulated database that takes
//! backups (some by another tool), switches recovery models and runs bulk operations, and
//! knows from its own history, not from LSN arithmetic, which instants a restore can
//! reach.

use super::*;
use RecoveryPointType::{CopyOnlyFull, Differential, Full, Log};
use proptest::prelude::*;

fn t(minutes: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap() + chrono::Duration::minutes(minutes)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Full,
    CopyOnlyFull,
    Differential,
    Log,
    ForeignFull,
    ForeignLog,
    ToSimple,
    ToFull,
    ToBulkLogged,
    BulkOperation,
    /// Transactions, so LSNs move between backups and checkpoints trail open ones.
    Activity,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Full),
        1 => Just(Op::CopyOnlyFull),
        3 => Just(Op::Differential),
        8 => Just(Op::Log),
        1 => Just(Op::ForeignFull),
        1 => Just(Op::ForeignLog),
        1 => Just(Op::ToSimple),
        2 => Just(Op::ToFull),
        1 => Just(Op::ToBulkLogged),
        1 => Just(Op::BulkOperation),
        3 => Just(Op::Activity),
    ]
}

/// One backup SQL Server took, with the truth about it.
#[derive(Debug, Clone)]
struct Taken {
    point: Point,
    foreign: bool,
    /// Differentials: the index (in `history`) of the full that set their base.
    true_base: Option<usize>,
}

#[derive(Debug, Default)]
struct Database {
    lsn: u128,
    model: Option<RecoveryModel>,
    /// The full that set the current differential base (index in `history`).
    base: Option<usize>,
    /// Log backups possible (a full was taken, and a full or differential since any
    /// switch from simple).
    log_chain_start: Option<Lsn>,
    log_end: Option<Lsn>,
    bulk_since_log: bool,
    history: Vec<Taken>,
    /// Instants at which the model switched to simple.
    simple_from: Vec<DateTime<Utc>>,
}

impl Database {
    fn model(&self) -> RecoveryModel {
        self.model.unwrap_or(RecoveryModel::Full)
    }

    fn advance(&mut self, by: u128) -> Lsn {
        self.lsn += by;
        Lsn(self.lsn)
    }

    fn take(
        &mut self,
        kind: RecoveryPointType,
        foreign: bool,
        at: DateTime<Utc>,
        busy: bool,
    ) -> bool {
        let model = self.model();
        let id = Uuid::from_u128(self.history.len() as u128 + 1);
        let point = match kind {
            Full | CopyOnlyFull => {
                // An open transaction began before the checkpoint on a busy database.
                let first = self.advance(1);
                let checkpoint = if busy { self.advance(3) } else { first };
                let last = self.advance(2);
                let guid = (kind == Full)
                    .then(|| Uuid::from_u128(0xBA5E_0000 + self.history.len() as u128));
                Point {
                    id,
                    backup_type: kind,
                    backup_time: at,
                    first_lsn: first,
                    last_lsn: last,
                    checkpoint_lsn: Some(checkpoint),
                    differential_base_lsn: (kind == Full).then_some(checkpoint),
                    differential_base_guid: guid,
                    has_bulk_logged_data: false,
                    recovery_model: Some(model),
                    recovery_fork_guid: Some(Uuid::nil()),
                }
            }
            Differential => {
                // Msg 3035: no current database backup.
                let Some(base) = self.base else { return false };
                let base_point = self.history[base].point.clone();
                let first = self.advance(1);
                let checkpoint = if busy { self.advance(3) } else { first };
                let last = self.advance(2);
                Point {
                    id,
                    backup_type: Differential,
                    backup_time: at,
                    first_lsn: first,
                    last_lsn: last,
                    checkpoint_lsn: Some(checkpoint),
                    differential_base_lsn: base_point.checkpoint_lsn,
                    differential_base_guid: base_point.differential_base_guid,
                    has_bulk_logged_data: false,
                    recovery_model: Some(model),
                    recovery_fork_guid: Some(Uuid::nil()),
                }
            }
            Log => {
                // Msg 4208 in simple; Msg 4214 with no base since the chain broke.
                if model == RecoveryModel::Simple {
                    return false;
                }
                let Some(first) = self.log_end.or(self.log_chain_start) else {
                    return false;
                };
                let last = self.advance(1);
                let p = Point {
                    id,
                    backup_type: Log,
                    backup_time: at,
                    first_lsn: first,
                    last_lsn: last,
                    checkpoint_lsn: None,
                    differential_base_lsn: None,
                    differential_base_guid: None,
                    has_bulk_logged_data: self.bulk_since_log,
                    recovery_model: Some(model),
                    recovery_fork_guid: Some(Uuid::nil()),
                };
                self.log_end = Some(last);
                self.bulk_since_log = false;
                p
            }
        };
        let true_base = (kind == Differential).then(|| self.base.unwrap());
        if kind == Full {
            self.base = Some(self.history.len());
        }
        if matches!(kind, Full | Differential)
            && model != RecoveryModel::Simple
            && self.log_end.is_none()
        {
            // The log chain begins with this backup's log records.
            self.log_chain_start = Some(point.first_lsn);
        }
        self.history.push(Taken {
            point,
            foreign,
            true_base,
        });
        true
    }

    fn run(ops: &[(Op, bool)]) -> Database {
        let mut db = Database::default();
        for (i, &(op, busy)) in ops.iter().enumerate() {
            let at = t(i as i64 * 10);
            match op {
                Op::Full => drop(db.take(Full, false, at, busy)),
                Op::CopyOnlyFull => drop(db.take(CopyOnlyFull, false, at, busy)),
                Op::Differential => drop(db.take(Differential, false, at, busy)),
                Op::Log => drop(db.take(Log, false, at, busy)),
                Op::ForeignFull => drop(db.take(Full, true, at, busy)),
                Op::ForeignLog => drop(db.take(Log, true, at, busy)),
                Op::ToSimple => {
                    if db.model() != RecoveryModel::Simple {
                        db.model = Some(RecoveryModel::Simple);
                        db.log_end = None;
                        db.log_chain_start = None;
                        db.simple_from.push(at);
                    }
                }
                Op::ToFull | Op::ToBulkLogged => {
                    let to = if op == Op::ToFull {
                        RecoveryModel::Full
                    } else {
                        RecoveryModel::BulkLogged
                    };
                    db.model = Some(to);
                }
                Op::BulkOperation => {
                    db.advance(5);
                    if db.model() == RecoveryModel::BulkLogged {
                        db.bulk_since_log = true;
                    }
                }
                Op::Activity => drop(db.advance(7)),
            }
        }
        db
    }

    fn catalogue(&self) -> Vec<Point> {
        self.history
            .iter()
            .filter(|b| !b.foreign)
            .map(|b| b.point.clone())
            .collect()
    }

    /// Whether a restore can reach `at`, from the history alone: a data backup in the
    /// catalogue (a differential only with its true base there too) at or before `at`,
    /// and, past it, every log backup up to the first ending at or after `at` in the
    /// catalogue, with no switch to simple before that log, `at` not inside a log holding
    /// bulk-logged changes, and the data backup's log records kept (not taken in simple
    /// and not in the window before a base re-established the chain).
    fn restorable(&self, at: DateTime<Utc>) -> bool {
        self.history.iter().enumerate().any(|(i, s)| {
            if s.foreign || s.point.backup_type == Log || s.point.backup_time > at {
                return false;
            }
            if s.point.backup_type == Differential && self.history[s.true_base.unwrap()].foreign {
                return false;
            }
            if s.point.backup_time == at {
                return true;
            }
            if s.point.recovery_model == Some(RecoveryModel::Simple) {
                return false;
            }
            // The log records after this backup are in some log backup only if a log
            // chain had begun at or before it.
            let logs_after: Vec<&Taken> = self.history[i + 1..]
                .iter()
                .filter(|b| b.point.backup_type == Log)
                .collect();
            let Some(first) = logs_after.first() else {
                return false;
            };
            if first.point.first_lsn > s.point.last_lsn {
                return false;
            }
            let mut reached = s.point.backup_time;
            for log in logs_after {
                if log.foreign {
                    return false;
                }
                if self
                    .simple_from
                    .iter()
                    .any(|&w| s.point.backup_time < w && w <= log.point.backup_time)
                {
                    return false;
                }
                if log.point.backup_time >= at {
                    let inside = reached < at && at < log.point.backup_time;
                    return !(inside && log.point.has_bulk_logged_data);
                }
                reached = log.point.backup_time;
            }
            false
        })
    }
}

/// What SQL Server's `RESTORE` would say of a sequence, checked against the history's
/// truth: the instant it reaches, or why it refuses.
fn replay(db: &Database, catalogue: &[Point], seq: &Sequence) -> Result<DateTime<Utc>, String> {
    let truth = |id: Uuid| db.history.iter().position(|b| b.point.id == id).unwrap();
    let steps = &seq.steps;
    let first = &catalogue[steps[0].point];
    if !matches!(first.backup_type, Full | CopyOnlyFull) {
        return Err("the first step restores a full".into());
    }
    let mut restored_full = truth(first.id);
    let mut redo = first.last_lsn;
    let mut data_time = first.backup_time;
    let mut model = first.recovery_model;
    let mut reached = data_time;
    let mut logs = 0;
    for (n, step) in steps.iter().enumerate() {
        let p = &catalogue[step.point];
        let last = n + 1 == steps.len();
        if (step.recovery == Recovery::Recovery) != last {
            return Err("only the last step recovers".into());
        }
        match p.backup_type {
            Full | CopyOnlyFull if n == 0 => {}
            Differential if n == 1 && logs == 0 => {
                if db.history[truth(p.id)].true_base != Some(restored_full) {
                    return Err("Msg 3136: not the differential's base".into());
                }
                restored_full = truth(p.id);
                redo = p.last_lsn;
                data_time = p.backup_time;
                reached = data_time;
                model = p.recovery_model;
            }
            Log => {
                if logs == 0 && model == Some(RecoveryModel::Simple) {
                    return Err("no log applies to a backup taken in simple recovery".into());
                }
                if p.last_lsn <= redo {
                    return Err("Msg 4326: log too early".into());
                }
                if p.first_lsn > redo {
                    return Err("Msg 4305: log too late".into());
                }
                if logs > 0 && p.first_lsn != redo {
                    return Err("logs out of sequence".into());
                }
                logs += 1;
                if let Some(stop) = step.stop_at {
                    if !last {
                        return Err("STOPAT before the last step".into());
                    }
                    if stop <= reached || stop >= p.backup_time {
                        return Err("STOPAT outside the log".into());
                    }
                    if p.has_bulk_logged_data {
                        return Err("STOPAT inside bulk-logged changes".into());
                    }
                    reached = stop;
                } else {
                    reached = p.backup_time;
                }
                redo = p.last_lsn;
            }
            _ => return Err(format!("step {n} cannot be a {:?}", p.backup_type)),
        }
    }
    Ok(reached)
}

fn ops() -> impl Strategy<Value = Vec<(Op, bool)>> {
    prop::collection::vec((op(), any::<bool>()), 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Ranges, plans and SQL Server agree on every instant.
    #[test]
    fn ranges_and_plans_are_what_sql_server_restores(ops in ops()) {
        let db = Database::run(&ops);
        let catalogue = db.catalogue();
        let chain = Catalogue::new(&catalogue);
        let ranges = chain.restorable_ranges();
        for minute in (-5..ops.len() as i64 * 10 + 5).step_by(5) {
            let at = t(minute);
            let truth = db.restorable(at);
            let in_range = ranges.iter().any(|r| r.from <= at && at <= r.to);
            prop_assert_eq!(in_range, truth, "ranges at minute {}: {:?}", minute, ranges);
            match chain.plan_to(at) {
                Ok(seq) => {
                    prop_assert!(truth, "a plan for minute {} SQL Server cannot reach", minute);
                    prop_assert_eq!(replay(&db, &catalogue, &seq), Ok(at), "minute {}", minute);
                }
                Err(_) => prop_assert!(!truth, "no plan for restorable minute {}", minute),
            }
        }
    }

    /// The state machine asks for a new base exactly when the latest backup it was given
    /// cannot be restored to.
    #[test]
    fn the_chain_state_knows_when_its_latest_backup_is_unrestorable(ops in ops(), discovery_sees_switches in any::<bool>()) {
        let db = Database::run(&ops);
        let mut state = ChainState::default();
        let mut model = RecoveryModel::Full;
        for b in db.history.iter().filter(|b| !b.foreign) {
            let seen = b.point.recovery_model.unwrap();
            if discovery_sees_switches && seen != model {
                state = model_changed(state, model, seen, true);
            }
            model = seen;
            state = apply(state, &b.point, true).state;
            if state.needs == Needs::Nothing {
                prop_assert!(db.restorable(b.point.backup_time), "{:?} at {}", b.point.backup_type, b.point.backup_time);
            }
        }
    }
}

fn full(id: u128, at: i64, first: u128, checkpoint: u128, last: u128) -> Point {
    Point {
        id: Uuid::from_u128(id),
        backup_type: Full,
        backup_time: t(at),
        first_lsn: Lsn(first),
        last_lsn: Lsn(last),
        checkpoint_lsn: Some(Lsn(checkpoint)),
        differential_base_lsn: Some(Lsn(checkpoint)),
        differential_base_guid: Some(Uuid::from_u128(id << 64)),
        has_bulk_logged_data: false,
        recovery_model: Some(RecoveryModel::Full),
        recovery_fork_guid: None,
    }
}

fn diff_on(base: &Point, id: u128, at: i64, first: u128, last: u128) -> Point {
    Point {
        id: Uuid::from_u128(id),
        backup_type: Differential,
        backup_time: t(at),
        first_lsn: Lsn(first),
        last_lsn: Lsn(last),
        checkpoint_lsn: Some(Lsn(first)),
        differential_base_lsn: base.checkpoint_lsn,
        differential_base_guid: base.differential_base_guid,
        ..base.clone()
    }
}

fn log(id: u128, at: i64, first: u128, last: u128) -> Point {
    Point {
        id: Uuid::from_u128(id),
        backup_type: Log,
        backup_time: t(at),
        first_lsn: Lsn(first),
        last_lsn: Lsn(last),
        checkpoint_lsn: None,
        differential_base_lsn: None,
        differential_base_guid: None,
        has_bulk_logged_data: false,
        recovery_model: Some(RecoveryModel::Full),
        recovery_fork_guid: None,
    }
}

fn range(from: i64, to: i64) -> TimeRange {
    TimeRange {
        from: t(from),
        to: t(to),
    }
}

#[test]
fn a_busy_databases_differential_matches_its_fulls_checkpoint_not_first_lsn() {
    let f = full(1, 0, 100, 140, 150);
    let d = diff_on(&f, 2, 60, 300, 310);
    assert_eq!(d.differential_base_lsn, Some(Lsn(140)));
    let applied = apply(apply(ChainState::default(), &f, true).state, &d, true);
    assert_eq!((applied.chain_break, applied.full_id), (None, Some(f.id)));
    let points = [f.clone(), d.clone()];
    let plan = Catalogue::new(&points).plan_to(t(60)).unwrap();
    assert_eq!(
        plan.steps.iter().map(|s| s.point).collect::<Vec<_>>(),
        [0, 1]
    );
    assert_eq!(
        (plan.steps[0].recovery, plan.steps[1].recovery),
        (Recovery::NoRecovery, Recovery::Recovery)
    );
}

#[test]
fn a_differential_on_another_tools_full_is_never_planned() {
    let f = full(1, 0, 100, 140, 150);
    let foreign = full(9, 30, 200, 220, 230);
    let d = diff_on(&foreign, 2, 60, 300, 310);
    let applied = apply(apply(ChainState::default(), &f, true).state, &d, true);
    assert_eq!(
        applied.chain_break,
        Some(ChainBreak::DifferentialBaseUnknown)
    );
    assert_eq!(applied.state.needs, Needs::Full);
    assert_eq!(applied.full_id, None);
    let points = [f, d];
    let chain = Catalogue::new(&points);
    assert_eq!(chain.base_of(1), None);
    assert_eq!(chain.restorable_ranges(), [range(0, 0)]);
    assert!(chain.plan_to(t(60)).is_err());
}

#[test]
fn fulls_without_logs_are_instants_not_a_range() {
    let mut a = full(1, 0, 100, 100, 110);
    let mut b = full(2, 24 * 60, 200, 200, 210);
    a.recovery_model = Some(RecoveryModel::Simple);
    b.recovery_model = Some(RecoveryModel::Simple);
    let points = [a, b];
    let chain = Catalogue::new(&points);
    assert_eq!(
        chain.restorable_ranges(),
        [range(0, 0), range(24 * 60, 24 * 60)]
    );
    assert!(matches!(
        chain.plan_to(t(12 * 60)),
        Err(PlanError::NotCovered { .. })
    ));
    assert_eq!(chain.plan_to(t(0)).unwrap().steps.len(), 1);
}

#[test]
fn a_differential_moves_where_the_next_log_may_start() {
    // The full, a differential, and a log that begins after the full's end but holds the
    // differential's: the log chain began at the differential (after a switch back from
    // simple).
    let f = full(1, 0, 100, 100, 110);
    let d = diff_on(&f, 2, 60, 300, 310);
    let l = log(3, 75, 305, 400);
    let points = [f, d, l];
    let chain = Catalogue::new(&points);
    assert_eq!(chain.restorable_ranges(), [range(0, 0), range(60, 75)]);
    let plan = chain.plan_to(t(70)).unwrap();
    assert_eq!(
        plan.steps.iter().map(|s| s.point).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(plan.steps[2].stop_at, Some(t(70)));
}

#[test]
fn bulk_logged_logs_restore_to_their_end_only() {
    let f = full(1, 0, 100, 100, 110);
    let l1 = log(2, 15, 100, 200);
    let mut l2 = log(3, 30, 200, 300);
    l2.has_bulk_logged_data = true;
    let l3 = log(4, 45, 300, 400);
    let points = [f, l1, l2, l3];
    let chain = Catalogue::new(&points);
    assert_eq!(chain.restorable_ranges(), [range(0, 15), range(30, 45)]);
    assert_eq!(
        chain.plan_to(t(20)),
        Err(PlanError::InsideBulkLoggedLog {
            log_from: t(15),
            log_to: t(30)
        })
    );
    let to_end = chain.plan_to(t(30)).unwrap();
    assert_eq!(to_end.steps.last().unwrap().stop_at, None);
    assert_eq!(chain.plan_to(t(40)).unwrap().steps.len(), 4);
}

#[test]
fn a_copy_only_full_starts_a_log_sequence_but_is_no_base() {
    let mut c = full(1, 0, 100, 105, 110);
    c.backup_type = CopyOnlyFull;
    c.differential_base_lsn = None;
    c.differential_base_guid = None;
    let l = log(2, 15, 90, 200);
    let points = [c.clone(), l];
    let chain = Catalogue::new(&points);
    assert_eq!(chain.restorable_ranges(), [range(0, 15)]);
    assert_eq!(chain.plan_to(t(10)).unwrap().steps.len(), 2);
    let applied = apply(ChainState::default(), &c, true);
    assert_eq!(applied.state.base, None);
    assert_eq!(
        applied.state.needs,
        Needs::Full,
        "a new chain whose first backup is copy-only still has no differential base"
    );
}

#[test]
fn a_log_gap_with_an_intact_full_heals_with_a_differential() {
    let f = full(1, 0, 100, 100, 110);
    let mut s = apply(ChainState::default(), &f, true).state;
    s = apply(s, &log(2, 15, 100, 200), true).state;
    // Another tool took the log 200..250.
    let gap = apply(s, &log(3, 45, 250, 300), true);
    assert_eq!(gap.chain_break, Some(ChainBreak::LogChainBroken));
    assert_eq!(gap.state.needs, Needs::Differential);
    let no_diff = apply(s, &log(3, 45, 250, 300), false);
    assert_eq!(
        no_diff.state.needs,
        Needs::Full,
        "a policy without differentials"
    );
    let next = apply(gap.state, &log(4, 60, 300, 350), true);
    assert_eq!(next.chain_break, None, "the same break is reported once");
    assert_eq!(next.state.needs, Needs::Differential);
    let healed = apply(next.state, &diff_on(&f, 5, 70, 360, 370), true);
    assert_eq!(healed.state.needs, Needs::Nothing);
    let after = apply(healed.state, &log(6, 75, 350, 400), true);
    assert_eq!(
        after.chain_break, None,
        "the next log holds the differential's end"
    );
}

#[test]
fn switching_to_simple_ends_the_range_and_back_needs_a_base() {
    let f = full(1, 0, 100, 100, 110);
    let s = apply(ChainState::default(), &f, true).state;
    let s = apply(s, &log(2, 15, 100, 200), true).state;
    let simple = model_changed(s, RecoveryModel::Full, RecoveryModel::Simple, true);
    assert_eq!(simple.log_end, None);
    let back = model_changed(simple, RecoveryModel::Simple, RecoveryModel::Full, true);
    assert_eq!(back.needs, Needs::Differential);
    let unverified = model_changed(simple, RecoveryModel::Simple, RecoveryModel::Full, false);
    assert_eq!(unverified.needs, Needs::Full);
}

#[test]
fn a_new_recovery_fork_restarts_the_chain() {
    let mut f = full(1, 0, 100, 100, 110);
    f.recovery_fork_guid = Some(Uuid::from_u128(7));
    let s = apply(ChainState::default(), &f, true).state;
    let mut l = log(2, 15, 100, 200);
    l.recovery_fork_guid = Some(Uuid::from_u128(8));
    let applied = apply(s, &l, true);
    assert_eq!(applied.chain_break, Some(ChainBreak::RecoveryForkChanged));
    assert_eq!(applied.state.needs, Needs::Full);
    let points = [f, l];
    assert_eq!(Catalogue::new(&points).restorable_ranges(), [range(0, 0)]);
    assert_eq!(overwritten().needs, Needs::Full);
}

#[test]
fn first_version_reports_say_what_could_not_be_checked() {
    let mut f = full(1, 0, 100, 100, 150);
    f.checkpoint_lsn = None;
    f.differential_base_guid = None;
    f.recovery_model = None;
    let mut d = diff_on(&f, 2, 60, 300, 310);
    d.differential_base_lsn = Some(Lsn(120));
    d.differential_base_guid = None;
    let s = apply(ChainState::default(), &f, true);
    assert_eq!(
        s.unverified,
        [
            UNVERIFIED_RECOVERY_MODEL,
            UNVERIFIED_FORK,
            UNVERIFIED_CHECKPOINT
        ]
    );
    let applied = apply(s.state, &d, true);
    assert_eq!(
        applied.full_id,
        Some(f.id),
        "a base inside the full's range is plausible"
    );
    assert!(applied.unverified.contains(&UNVERIFIED_DIFFERENTIAL_BASE));
    d.differential_base_lsn = Some(Lsn(99));
    assert_eq!(
        apply(s.state, &d, true).chain_break,
        Some(ChainBreak::DifferentialBaseUnknown)
    );
}
