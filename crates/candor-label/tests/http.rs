//! The server through a real HTTP client: rank, tie, skip, flag, a restart in the middle,
//! two labellers submitting at the same moment, the limits; the output file afterwards
//! holds exactly the answers given.

use std::path::Path;
use std::sync::{Arc, Barrier};

use candor_label::{ServeOptions, Server};
use serde_json::{json, Value};

const ANA: &str = "ana-token-0123456789";
const BEN: &str = "ben-token-0123456789";

struct Client {
    agent: ureq::Agent,
    base: String,
}

impl Client {
    fn new(server: &Server) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Client {
            agent,
            base: format!("http://{}", server.addr()),
        }
    }

    fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut res = req.call().unwrap();
        let status = res.status().as_u16();
        (status, res.body_mut().read_json().unwrap_or(Value::Null))
    }

    fn post(&self, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json");
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut res = req.send(body).unwrap();
        let status = res.status().as_u16();
        (status, res.body_mut().read_json().unwrap_or(Value::Null))
    }

    fn next_id(&self, token: &str) -> Option<u64> {
        let (status, v) = self.get("/api/next", Some(token));
        assert_eq!(status, 200, "{v}");
        v["item"]["id"].as_u64()
    }

    fn answer(&self, token: &str, a: Value) -> (u16, Value) {
        self.post("/api/answer", Some(token), &a.to_string())
    }
}

fn setup() -> (tempfile::TempDir, ServeOptions) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("candidates.jsonl");
    std::fs::write(
        &input,
        [
            r#"{"prompt": "p0", "responses": ["a0", "b0"]}"#,
            r#"{"prompt": "p1", "responses": ["a1", "b1", "c1"], "reference": "r1"}"#,
            r#"{"prompt": "p2", "responses": ["a2", "b2", "c2", "d2"]}"#,
        ]
        .join("\n")
            + "\n",
    )
    .unwrap();
    let team = dir.path().join("team.yaml");
    std::fs::write(
        &team,
        format!("- {{name: ana, token: {ANA}, lead: true}}\n- {{name: ben, token: {BEN}}}\n"),
    )
    .unwrap();
    let opts = ServeOptions {
        input,
        out: dir.path().join("rankings.jsonl"),
        bind: "127.0.0.1:0".into(),
        labellers: Some(team),
        overlap: 2,
    };
    (dir, opts)
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_team_ranks_through_http_and_the_file_holds_exactly_their_answers() {
    let (_dir, opts) = setup();
    let server = Server::start(&opts, false).unwrap();
    let c = Client::new(&server);

    // tokens: none, wrong, and a labeller asking for the team's figures
    assert_eq!(c.get("/api/next", None).0, 401);
    assert_eq!(c.get("/api/next", Some("ana-token-0123456780")).0, 401);
    assert_eq!(c.get("/api/stats", Some(BEN)).0, 403);
    let (status, v) = c.get("/api/next", Some(ANA));
    assert_eq!(status, 200);
    assert_eq!(v["labeller"], "ana");
    assert_eq!(
        v["item"],
        json!({"id": 0, "prompt": "p0", "responses": ["a0", "b0"]})
    );
    assert_eq!(v["progress"]["team_needed"], 6);

    // rank with a flag and a comment; a tie; overlap 2 gives ben the same prompt
    let (status, v) = c.answer(
        ANA,
        json!({"id": 0, "order": [[1], [0]], "flags": [[], ["harmful"]], "comment": "B is unkind", "seconds": 3.2}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(c.next_id(BEN), Some(0));
    assert_eq!(
        c.answer(BEN, json!({"id": 0, "order": [[0, 1]], "seconds": 4}))
            .0,
        200
    );
    // skip: ana leaves p1 and gets p2
    assert_eq!(c.next_id(ANA), Some(1));
    assert_eq!(c.post("/api/skip", Some(ANA), r#"{"id": 1}"#).0, 200);
    assert_eq!(c.next_id(ANA), Some(2));
    let (status, v) = c.answer(
        ANA,
        json!({"id": 2, "order": [[3], [0, 2], [1]], "flags": [[], ["off_topic"], [], ["untruthful"]], "seconds": 12.34}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["progress"]["mine"], 2);

    // bad requests are refused and write nothing
    let (status, v) = c.answer(ANA, json!({"id": 1, "order": [[0], [1]]}));
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("exactly once"), "{v}");
    assert_eq!(c.post("/api/answer", Some(ANA), "{not json").0, 400);
    let big = json!({"id": 1, "order": [[0], [1], [2]], "comment": "x".repeat(100_000)});
    assert_eq!(c.answer(ANA, big).0, 413, "bodies are size-limited");
    assert_eq!(lines(&opts.out).len(), 3);

    // restart in the middle: the file is the record
    server.stop().unwrap();
    let server = Server::start(&opts, false).unwrap();
    let c = Client::new(&server);
    assert_eq!(c.next_id(ANA), Some(1), "ana's ranked prompts stay done");
    let (status, _) = c.answer(ANA, json!({"id": 0, "order": [[0], [1]]}));
    assert_eq!(status, 409, "a second answer to the same prompt is refused");
    assert_eq!(c.next_id(BEN), Some(1));

    // two labellers submitting at the same moment both land
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = [
        (
            ANA,
            json!({"id": 1, "order": [[2], [1], [0]], "seconds": 1}),
        ),
        (BEN, json!({"id": 1, "order": [[0], [1, 2]], "seconds": 2})),
    ]
    .into_iter()
    .map(|(token, a)| {
        let barrier = barrier.clone();
        let base = c.base.clone();
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            barrier.wait();
            agent
                .post(format!("{base}/api/answer"))
                .header("Authorization", format!("Bearer {token}"))
                .send(a.to_string())
                .unwrap()
                .status()
                .as_u16()
        })
    })
    .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    assert_eq!(
        c.next_id(ANA),
        None,
        "p2 still needs ben, nothing needs ana"
    );
    assert_eq!(c.next_id(BEN), Some(2));
    let (status, v) = c.get("/api/stats", Some(ANA));
    assert_eq!(status, 200);
    assert_eq!(v["progress"]["team_done"], 5);
    assert_eq!(v["stats"]["pairwise"][0]["prompts"], 2);
    server.stop().unwrap();

    let got = lines(&opts.out);
    let want = [
        json!({"prompt": "p0", "responses": ["b0", "a0"], "ranks": [1, 2], "labeller": "ana", "seconds": 3.2, "flags": [["harmful"], []], "comment": "B is unkind"}),
        json!({"prompt": "p0", "responses": ["a0", "b0"], "ranks": [1, 1], "labeller": "ben", "seconds": 4.0, "flags": [[], []], "comment": ""}),
        json!({"prompt": "p2", "responses": ["d2", "a2", "c2", "b2"], "ranks": [1, 2, 2, 3], "labeller": "ana", "seconds": 12.3, "flags": [["untruthful"], [], [], ["off_topic"]], "comment": ""}),
    ];
    let concurrent = [
        json!({"prompt": "p1", "responses": ["c1", "b1", "a1"], "ranks": [1, 2, 3], "reference": "r1", "labeller": "ana", "seconds": 1.0, "flags": [[], [], []], "comment": ""}),
        json!({"prompt": "p1", "responses": ["a1", "b1", "c1"], "ranks": [1, 2, 2], "reference": "r1", "labeller": "ben", "seconds": 2.0, "flags": [[], [], []], "comment": ""}),
    ];
    assert_eq!(got.len(), 5, "{got:#?}");
    assert_eq!(got[..3], want);
    assert!(
        got[3..] == concurrent || got[3..] == [concurrent[1].clone(), concurrent[0].clone()],
        "{got:#?}"
    );
    // the reward stage's reader takes the file as it is
    let prefs = candor_data::preference::read_preferences(&opts.out).unwrap();
    assert_eq!(prefs.len(), 5);
    assert_eq!(
        candor_label::book::remaining(&opts.input, &opts.out, 2).unwrap(),
        (1, 6)
    );
}

#[test]
fn unsafe_setups_are_refused_before_serving() {
    let (_dir, opts) = setup();
    let wide = ServeOptions {
        bind: "0.0.0.0:0".into(),
        labellers: None,
        overlap: 1,
        ..opts.clone()
    };
    let e = Server::start(&wide, false).err().unwrap().to_string();
    assert!(
        e.contains("--bind 0.0.0.0:0") && e.contains("--labellers"),
        "{e}"
    );
    let solo_overlap = ServeOptions {
        labellers: None,
        ..opts.clone()
    };
    let e = Server::start(&solo_overlap, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--overlap 2"), "{e}");
    let same = ServeOptions {
        out: opts.input.clone(),
        ..opts.clone()
    };
    let e = Server::start(&same, false).err().unwrap().to_string();
    assert!(e.contains("must differ from --in"), "{e}");
}

#[test]
fn the_page_is_served_with_a_policy_that_forbids_inline_script() {
    let (_dir, opts) = setup();
    let server = Server::start(&opts, false).unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let res = agent.get(server.url()).call().unwrap();
    let csp = res
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let page = res.into_body().read_to_string().unwrap();
    assert!(page.contains("<script src=\"/label.js\" defer></script>"));
    let js = agent
        .get(format!("{}label.js", server.url()))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(
        !js.contains("innerHTML") && !js.contains("insertAdjacentHTML"),
        "data is written as text only"
    );
}
