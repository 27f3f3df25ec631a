//! `crp-mcp config <client>`: a ready-to-paste block that adds crp-mcp to an MCP client.
//!
//! JSON is written with serde_json and TOML (codex) with the toml crate, so paths with
//! backslashes, quotes or spaces come out correctly escaped. stdout carries only the block
//! (valid JSON / TOML / one shell command); where to put it goes to stderr.
//!
//! With installed identities, every one gets an entry (`CRP_AGENT_ID` + `CRP_PROVIDER_URL`);
//! without any (or with `--embedded`), one entry serves the local vault in-process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::identity::Identity;

/// The clients `config` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Client {
    /// Claude Code (`claude mcp add`).
    ClaudeCode,
    /// Claude Desktop (`claude_desktop_config.json`).
    ClaudeDesktop,
    /// Cursor (`.cursor/mcp.json`).
    Cursor,
    /// VS Code (`.vscode/mcp.json`, key `servers`).
    Vscode,
    /// Windsurf (`~/.codeium/windsurf/mcp_config.json`).
    Windsurf,
    /// OpenAI Codex (`~/.codex/config.toml`).
    Codex,
}

impl Client {
    /// Where the block goes (shown on stderr).
    pub fn target(self) -> &'static str {
        match self {
            Self::ClaudeCode => "run this command (or put the `mcpServers` block in .mcp.json / ~/.claude.json)",
            Self::ClaudeDesktop => {
                "merge into claude_desktop_config.json (macOS: ~/Library/Application Support/Claude/, \
                 Linux: ~/.config/Claude/, Windows: %APPDATA%\\Claude\\)"
            }
            Self::Cursor => "merge into ~/.cursor/mcp.json (user) or .cursor/mcp.json (project)",
            Self::Vscode => "merge into .vscode/mcp.json (workspace) or the user mcp.json",
            Self::Windsurf => "merge into ~/.codeium/windsurf/mcp_config.json",
            Self::Codex => "append to ~/.codex/config.toml",
        }
    }
}

/// One server entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Key in the client's server map.
    pub name: String,
    /// Executable.
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
}

/// The command to put in configs: this executable's absolute path, or the bare name when it
/// sits inside `node_modules` (so npm upgrades do not break configs).
pub fn command_path(exe: Option<PathBuf>) -> String {
    match exe {
        Some(p) if !p.components().any(|c| c.as_os_str() == "node_modules") => p.to_string_lossy().into_owned(),
        _ => "crp-mcp".to_owned(),
    }
}

/// `slug(name)`: lowercase, spaces and `_` to `-`, other characters dropped; `agent` if empty.
pub fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .filter_map(|c| match c {
            'A'..='Z' => Some(c.to_ascii_lowercase()),
            'a'..='z' | '0'..='9' | '-' => Some(c),
            ' ' | '_' => Some('-'),
            _ => None,
        })
        .collect();
    let s = s.trim_matches('-').to_owned();
    if s.is_empty() { "agent".into() } else { s }
}

/// Entries for `identities` (remote mode), or one embedded entry when there are none.
pub fn entries(command: &str, identities: &[Identity], home: Option<&Path>, base_name: &str) -> Vec<Entry> {
    let mut home_env = BTreeMap::new();
    if let Some(h) = home {
        home_env.insert("CRP_HOME".to_owned(), h.to_string_lossy().into_owned());
    }
    if identities.is_empty() {
        return vec![Entry { name: base_name.to_owned(), command: command.to_owned(), args: vec!["serve".into()], env: home_env }];
    }
    let mut out: Vec<Entry> = Vec::new();
    for id in identities {
        let mut name =
            if identities.len() == 1 { base_name.to_owned() } else { format!("{base_name}-{}", slug(&id.file.name)) };
        if out.iter().any(|e| e.name == name) {
            name = format!("{name}-{}", slug(id.agent_id()));
        }
        let mut env = home_env.clone();
        env.insert("CRP_AGENT_ID".into(), id.agent_id().to_owned());
        env.insert("CRP_PROVIDER_URL".into(), id.file.provider.clone());
        out.push(Entry { name, command: command.to_owned(), args: vec!["serve".into()], env });
    }
    out
}

#[derive(Serialize)]
struct JsonServer<'a> {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    command: &'a str,
    args: &'a [String],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    env: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct CodexServer<'a> {
    command: &'a str,
    args: &'a [String],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    env: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct CodexDoc<'a> {
    mcp_servers: BTreeMap<&'a str, CodexServer<'a>>,
}

/// POSIX shell quoting: bare when safe, else single quotes.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Render the block for `client`.
pub fn render(client: Client, entries: &[Entry]) -> Result<String> {
    if entries.is_empty() {
        bail!("nothing to configure");
    }
    Ok(match client {
        Client::ClaudeCode => {
            let mut lines = Vec::new();
            for e in entries {
                let mut cmd = vec!["claude".to_owned(), "mcp".into(), "add".into(), shell_quote(&e.name)];
                for (k, v) in &e.env {
                    cmd.push("--env".into());
                    cmd.push(shell_quote(&format!("{k}={v}")));
                }
                cmd.push("--".into());
                cmd.push(shell_quote(&e.command));
                cmd.extend(e.args.iter().map(|a| shell_quote(a)));
                lines.push(cmd.join(" "));
            }
            lines.join("\n") + "\n"
        }
        Client::Codex => {
            let doc = CodexDoc {
                mcp_servers: entries
                    .iter()
                    .map(|e| (e.name.as_str(), CodexServer { command: &e.command, args: &e.args, env: &e.env }))
                    .collect(),
            };
            toml::to_string(&doc)?
        }
        Client::Vscode | Client::ClaudeDesktop | Client::Cursor | Client::Windsurf => {
            let (key, kind) = if client == Client::Vscode { ("servers", Some("stdio")) } else { ("mcpServers", None) };
            let servers: BTreeMap<&str, JsonServer> = entries
                .iter()
                .map(|e| (e.name.as_str(), JsonServer { kind, command: &e.command, args: &e.args, env: &e.env }))
                .collect();
            let mut doc = serde_json::Map::new();
            doc.insert(key.into(), serde_json::to_value(servers)?);
            serde_json::to_string_pretty(&doc)? + "\n"
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityFile;

    fn ident(id: &str, name: &str) -> Identity {
        Identity {
            file: IdentityFile {
                agent_id: id.into(),
                name: name.into(),
                provider: "http://127.0.0.1:7700".into(),
                public_key: String::new(),
                private_key_path: PathBuf::new(),
                created_at: String::new(),
            },
            dir: PathBuf::new(),
        }
    }

    const WIN: &str = r#"C:\Program Files\crp "x"\crp-mcp.exe"#;

    #[test]
    fn json_escapes_windows_paths() {
        let e = entries(WIN, &[], Some(Path::new(r"C:\Users\me\.crp")), "crp");
        for client in [Client::ClaudeDesktop, Client::Cursor, Client::Windsurf, Client::Vscode] {
            let out = render(client, &e).unwrap();
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let key = if client == Client::Vscode { "servers" } else { "mcpServers" };
            assert_eq!(v[key]["crp"]["command"], WIN);
            assert_eq!(v[key]["crp"]["args"], serde_json::json!(["serve"]));
            assert_eq!(v[key]["crp"]["env"]["CRP_HOME"], r"C:\Users\me\.crp");
            assert_eq!(v[key]["crp"].get("type").is_some(), client == Client::Vscode);
        }
    }

    #[test]
    fn codex_is_valid_toml() {
        let ids = [ident("ag-1", "Deploy Bot"), ident("ag-2", "Deploy Bot")];
        let e = entries(WIN, &ids, None, "crp");
        assert_eq!(e[0].name, "crp-deploy-bot");
        assert_eq!(e[1].name, "crp-deploy-bot-ag-2");
        let out = render(Client::Codex, &e).unwrap();
        let v: toml::Value = toml::from_str(&out).unwrap();
        assert_eq!(v["mcp_servers"]["crp-deploy-bot"]["command"].as_str().unwrap(), WIN);
        assert_eq!(v["mcp_servers"]["crp-deploy-bot-ag-2"]["env"]["CRP_AGENT_ID"].as_str().unwrap(), "ag-2");
    }

    #[test]
    fn claude_code_command_is_quoted() {
        let e = entries("/opt/my tools/crp-mcp", &[ident("ag-1", "x")], None, "crp");
        let out = render(Client::ClaudeCode, &e).unwrap();
        assert_eq!(
            out.trim(),
            "claude mcp add crp --env CRP_AGENT_ID=ag-1 --env CRP_PROVIDER_URL=http://127.0.0.1:7700 -- '/opt/my tools/crp-mcp' serve"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn command_path_and_slug() {
        assert_eq!(command_path(Some(PathBuf::from("/usr/local/bin/crp-mcp"))), "/usr/local/bin/crp-mcp");
        assert_eq!(command_path(Some(PathBuf::from("/p/node_modules/.bin/crp-mcp"))), "crp-mcp");
        assert_eq!(command_path(None), "crp-mcp");
        assert_eq!(slug("My Agent_1!"), "my-agent-1");
        assert_eq!(slug("!!!"), "agent");
    }
}
