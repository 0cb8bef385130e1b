//! A real browser: headless Chromium, driven through chromedriver's W3C WebDriver HTTP API,
//! opens the page, ranks two prompts with the page's own controls (buttons and flags with
//! the mouse, then the keyboard), reloads, and the output holds both rankings. A response
//! made of `<script>` and `<img onerror>` must show as text and run nothing.
//!
//! Needs Debian's `chromium` and `chromium-driver`; without them the test says so loudly and
//! passes, except in CI (`CI=true`), where their absence is a failure.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candor_label::{ServeOptions, Server};
use serde_json::{json, Value};

const SCRIPT: &str = "<script>window.__xss = 1; alert(1)</script>";
const IMG: &str = "<img src=x onerror=\"window.__xss = 2; alert(2)\">";

fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|n| {
        std::env::split_paths(&path)
            .map(|d| d.join(n))
            .find(|p| p.is_file())
    })
}

struct Driver {
    agent: ureq::Agent,
    base: String,
    session: String,
    child: Child,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self
            .agent
            .delete(format!("{}/session/{}", self.base, self.session))
            .call();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn request(agent: &ureq::Agent, method: &str, url: &str, body: Option<&Value>) -> (u16, Value) {
    let mut res = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        ("DELETE", _) => agent.delete(url).call(),
        (_, b) => agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(b.cloned().unwrap_or(json!({})).to_string()),
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = res.status().as_u16();
    (status, res.body_mut().read_json().unwrap_or(Value::Null))
}

impl Driver {
    fn start(chromium: &Path, chromedriver: &Path, profile: &Path) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let mut driver = Driver {
            agent,
            base,
            session: String::new(),
            child,
        };
        let t = Instant::now();
        loop {
            let ready = driver
                .agent
                .get(format!("{}/status", driver.base))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1100,900",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium.display().to_string(), "args": args},
        }}});
        let (status, v) = request(
            &driver.agent,
            "POST",
            &format!("{}/session", driver.base),
            Some(&caps),
        );
        assert_eq!(status, 200, "new session: {v}");
        driver.session = v["value"]["sessionId"].as_str().unwrap().to_string();
        driver
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let (status, v) = request(&self.agent, method, &url, body.as_ref());
        (status, v["value"].clone())
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body);
        assert_eq!(status, 200, "{method} {path}: {v}");
        v
    }

    fn script(&self, js: &str) -> Value {
        self.ok(
            "POST",
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
    }

    fn wait_for(&self, js: &str) {
        let t = Instant::now();
        while self.script(js) != json!(true) {
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "timed out waiting for: {js}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn click(&self, css: &str) {
        let e = self.ok(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        let id = e
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        self.ok("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.ok(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        let id = e
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        self.ok(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        );
    }

    /// Press keys one after another (WebDriver key actions; "\u{E007}" is Enter).
    fn keys(&self, keys: &[&str]) {
        let actions: Vec<Value> = keys
            .iter()
            .flat_map(|k| {
                [
                    json!({"type": "keyDown", "value": k}),
                    json!({"type": "keyUp", "value": k}),
                ]
            })
            .collect();
        self.ok(
            "POST",
            "/actions",
            Some(json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})),
        );
    }

    fn no_alert(&self) {
        let (status, v) = self.call("GET", "/alert/text", None);
        assert_eq!(
            (status, v["error"].as_str()),
            (404, Some("no such alert")),
            "an alert opened: a script ran ({v})"
        );
    }
}

#[test]
fn a_browser_ranks_two_prompts_and_model_text_stays_text() {
    let (Some(chromium), Some(chromedriver)) = (
        find(&["chromium", "chromium-browser"]),
        find(&["chromedriver"]),
    ) else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but chromium or chromedriver is missing: .ci/run installs them (apt-get install chromium chromium-driver)");
        }
        eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        eprintln!("!! SKIPPED the real-browser test of `candor label`: chromium and/or     !!");
        eprintln!(
            "!! chromedriver are not installed (apt-get install chromium chromium-driver) !!"
        );
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("candidates.jsonl");
    let hostile = json!({"prompt": "Greet the user in <b>bold</b>", "responses": [SCRIPT, IMG]});
    let count =
        json!({"prompt": "Count to three", "responses": ["1 2 3", "one two three", "3 2 1"]});
    std::fs::write(&input, format!("{hostile}\n{count}\n")).unwrap();
    let opts = ServeOptions {
        input,
        out: dir.path().join("rankings.jsonl"),
        bind: "127.0.0.1:0".into(),
        labellers: None,
        overlap: 1,
    };
    let server = Server::start(&opts, false).unwrap();
    let profile = dir.path().join("chromium-profile");
    let d = Driver::start(&chromium, &chromedriver, &profile);
    d.ok("POST", "/url", Some(json!({"url": server.url()})));

    // 1. the hostile prompt: shown as text, nothing ran
    d.wait_for("return document.querySelectorAll('#responses li.card').length === 2");
    let seen = d.script(
        "return {prompt: document.getElementById('prompt').textContent, \
                 texts: Array.from(document.querySelectorAll('.response-text')).map(e => e.textContent), \
                 imgs: document.querySelectorAll('img').length, \
                 bold: document.querySelectorAll('b').length, \
                 scripts: document.querySelectorAll('script').length, \
                 xss: window.__xss === undefined ? null : window.__xss}",
    );
    assert_eq!(
        seen,
        json!({"prompt": "Greet the user in <b>bold</b>", "texts": [SCRIPT, IMG],
               "imgs": 0, "bold": 0, "scripts": 1, "xss": null}),
        "model text must be shown as text"
    );
    d.no_alert();
    // rank with the mouse: move A down (B is better), flag A harmful, write a comment
    d.click("li.card[data-response='0'] button.down");
    d.click("li.card[data-response='0'] input[data-flag='harmful']");
    d.type_into("#comment", "A tries to run a script");
    d.click("#submit");
    d.wait_for("return document.getElementById('prompt').textContent === 'Count to three'");

    // 2. with the keyboard: select B, tie it with A, select C, move it to the top, flag it
    // harmful, submit
    d.click("#prompt"); // focus off the submit button
    d.keys(&["j", "=", "j", "K", "h", "\u{E007}"]);
    d.wait_for("return !document.getElementById('done').hidden");

    // 3. reload: still done, and the file holds both
    d.ok("POST", "/refresh", Some(json!({})));
    d.wait_for("return !document.getElementById('done').hidden && document.getElementById('progress-text').textContent.startsWith('you: 2 ranked')");
    assert_eq!(d.script("return window.__xss === undefined"), json!(true));
    d.no_alert();
    drop(d);
    server.stop().unwrap();

    let got: Vec<Value> = std::fs::read_to_string(&opts.out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 2, "{got:#?}");
    let without_seconds = |v: &Value| {
        let mut v = v.clone();
        let s = v.as_object_mut().unwrap().remove("seconds").unwrap();
        assert!(s.as_f64().unwrap() >= 0.0);
        v
    };
    assert_eq!(
        without_seconds(&got[0]),
        json!({"prompt": "Greet the user in <b>bold</b>", "responses": [IMG, SCRIPT], "ranks": [1, 2],
               "labeller": "local", "flags": [[], ["harmful"]], "comment": "A tries to run a script"})
    );
    assert_eq!(
        without_seconds(&got[1]),
        json!({"prompt": "Count to three", "responses": ["3 2 1", "1 2 3", "one two three"], "ranks": [1, 2, 2],
               "labeller": "local", "flags": [["harmful"], [], []], "comment": ""})
    );
}
