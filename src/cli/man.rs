//! `segsync man [--out-dir DIR]`: the manual pages, from the same argument definitions as
//! `--help`, so they cannot drift from the binary. `segsync(1)` adds what clap does not know:
//! EXIT STATUS (the [`Exit`] table), ENVIRONMENT, FILES and SEE ALSO. The config and rule pages,
//! `segsync.toml(5)` and `segsync-rules(7)`, are written by hand (packaging/man/).

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use super::{Cli, Exit};

/// The sections of `segsync(1)` after SUBCOMMANDS, in roff.
const SECTIONS: &str = r#".SH "EXIT STATUS"
Every command uses one table:
.TP
.B 0
Everything done.
.TP
.B 1
A runtime failure: the API, the state database (one this user cannot read included), a failed,
partial or interrupted rule run, a failed rule test; for \fBstatus\fR, a rule whose last run failed or
that is overdue.
.TP
.B 2
Wrong command-line usage.
.TP
.B 3
An invalid configuration or rule file (no configuration found included).
.TP
.B 4
A guard held a change (mass removal); nothing failed. Confirm with
\fBsegsync sync\fR \fIRULE\fR \fB\-\-allow\-mass\-removal\fR.
.TP
.B 5
\fBplan \-\-detailed\-exitcode\fR: changes are pending.
.TP
.B 130
\fBsync\fR stopped waiting for the daemon's runs (SIGINT or SIGTERM); the daemon still runs what it took.
.PP
Errors always go to standard error; standard output carries only a command's output (\fB\-\-json\fR
documents included).
.SH ENVIRONMENT
.TP
.B SEGSYNC_CONFIG
The configuration file when \fB\-\-config\fR is not given.
.TP
.B CREDENTIALS_DIRECTORY
Set by systemd for \fBLoadCredential=\fR: where \fBapi.key_credential\fR is read. Unset, with the
packaged configuration, the key is read from \fI/etc/segsync\fR (so commands work by hand as root).
.TP
.B RUST_LOG
Filters the log (\fBinfo\fR by default; \fBdebug\fR adds retries and rate-limit pauses).
.TP
.B JOURNAL_STREAM
Set by systemd when standard error is the journal: with \fB[log] format = "auto"\fR, events are written
to the journal natively, with their fields (\fBjournalctl RULE=vip\fR).
.SH FILES
.TP
.I /etc/segsync/config.toml
The configuration (see \fBsegsync.toml\fR(5)). Without \fB\-\-config\fR or \fB$SEGSYNC_CONFIG\fR,
\fI./config.toml\fR is used when present, else this file.
.TP
.I /etc/segsync/rules/
The rules: \fINAME\fR\fB.rhai\fR, their tests \fINAME\fR\fB.test.toml\fR, helpers in \fBlib/\fR (see
\fBsegsync\-rules\fR(7)). Empty when installed.
.TP
.I /etc/segsync/api_key
The account's API key (mode 0600), handed to the service by systemd as the credential \fBapi_key\fR.
.TP
.I /var/lib/segsync/segsync.db
The state: list bindings, the membership cache, run and membership history. Readable by the service
and root only.
.TP
.I /usr/share/doc/segsync/examples/
Example rules, a sandbox configuration, alert rules and a Grafana dashboard.
.SH "SEE ALSO"
\fBsegsync.toml\fR(5), \fBsegsync\-rules\fR(7), \fBsystemctl\fR(1), \fBjournalctl\fR(1),
\fI/usr/share/doc/segsync/README.md\fR
"#;

/// `segsync(1)`: clap's sections, then [`SECTIONS`], then the version.
fn top_page() -> anyhow::Result<Vec<u8>> {
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let man = clap_mangen::Man::new(command);
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    man.render_subcommands_section(&mut page)?;
    page.extend_from_slice(SECTIONS.as_bytes());
    man.render_version_section(&mut page)?;
    Ok(page)
}

/// Prints `segsync(1)`, or writes it and one page per subcommand (`segsync-run(1)`, …) to `out_dir`.
pub(super) fn man(out_dir: Option<&Path>) -> anyhow::Result<Exit> {
    let page = top_page().context("writing the man page")?;
    let Some(dir) = out_dir else {
        super::write_out(&page, false);
        return Ok(Exit::Ok);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir).with_context(|| format!("writing man pages to {}", dir.display()))?;
    std::fs::write(dir.join("segsync.1"), page).with_context(|| format!("writing {}/segsync.1", dir.display()))?;
    Ok(Exit::Ok)
}
