//! A small HTTP client for one real server and token, with the waits tests need: a job's
//! end through the API's long-poll, a gauge of `/metrics`.

use std::time::Duration;

use serde_json::{Value, json};

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Api {
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.to_owned(),
            token: token.to_owned(),
        }
    }

    /// The same server with another token (an agent's, an enrollment token, ...).
    pub fn with_token(&self, token: &str) -> Self {
        Self::new(&self.base, token)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        (
            res.status().as_u16(),
            res.json().await.unwrap_or(Value::Null),
        )
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let res = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (
            res.status().as_u16(),
            res.json().await.unwrap_or(Value::Null),
        )
    }

    /// Any method, with an optional body and extra headers.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.unwrap();
        (
            res.status().as_u16(),
            res.json().await.unwrap_or(Value::Null),
        )
    }

    /// POSTs `body` and expects `status`; returns the answer's body.
    pub async fn post_expecting(&self, path: &str, body: Value, status: u16) -> Value {
        let (got, answer) = self.post(path, body).await;
        assert_eq!(got, status, "POST {path}: {answer}");
        answer
    }

    /// The value of an unlabelled series of `/metrics` (e.g. `backvault_long_polls_waiting`).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .find_map(|v| v.trim().parse().ok())
    }

    /// An enrollment token for as many agents as a test starts (up to 100).
    pub async fn enrollment_token(&self, subscription: &str) -> String {
        self.enrollment_token_for(subscription, 100).await
    }

    /// An enrollment token that enrolls `uses` VMs.
    pub async fn enrollment_token_for(&self, subscription: &str, uses: u32) -> String {
        let body = self
            .post_expecting(
                "/v1/enrollment-tokens",
                json!({"subscription_id": subscription, "max_uses": uses}),
                201,
            )
            .await;
        body["token"].as_str().unwrap().to_owned()
    }

    /// Enrolls a VM of `vm_facts(name)` with this client's enrollment token; returns a
    /// client with the agent token it was given.
    pub async fn enroll_agent(&self, name: &str) -> Api {
        let enrolled = self
            .post_expecting("/v1/agent/enroll", json!({"facts": vm_facts(name)}), 200)
            .await;
        self.with_token(enrolled["agent_token"].as_str().unwrap())
    }

    /// Waits (server-side long-polls) until the job has finished; returns it.
    pub async fn finished_job(&self, id: &str) -> Value {
        self.job_until(id, |job| {
            !matches!(job["status"].as_str(), Some("queued" | "in_progress"))
        })
        .await
    }

    /// As [`Api::finished_job`], and the job must have completed.
    pub async fn completed_job(&self, id: &str) -> Value {
        let job = self.finished_job(id).await;
        assert_eq!(job["status"], "completed", "{job}");
        job
    }

    /// Waits until `check` holds for the job (up to 60 s in all): checks the job as it is,
    /// then long-polls for a change from the copy checked (`If-None-Match`, which answers
    /// at once if the job has changed meanwhile), and checks again.
    pub async fn job_until(&self, id: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = super::Deadline::within(Duration::from_secs(60), &format!("job {id}"));
        let (mut etag, mut job) = self
            .job(id, None)
            .await
            .expect("an unconditional GET answers");
        loop {
            if check(&job) {
                return job;
            }
            deadline.check(|| job.to_string());
            if let Some(changed) = self.job(id, Some(&etag)).await {
                (etag, job) = changed;
            }
        }
    }

    /// The job and its ETag. With `changed_from` (an ETag), a long-poll of up to 10 s for
    /// a copy unlike that one: `None` (304) if the job did not change meanwhile.
    async fn job(&self, id: &str, changed_from: Option<&str>) -> Option<(String, Value)> {
        let mut request = match changed_from {
            None => self.http.get(format!("{}/v1/jobs/{id}", self.base)),
            Some(etag) => self
                .http
                .get(format!("{}/v1/jobs/{id}?wait=10s", self.base))
                .header("if-none-match", etag),
        };
        request = request.bearer_auth(&self.token);
        let res = request.send().await.unwrap();
        if changed_from.is_some() && res.status() == 304 {
            return None;
        }
        assert_eq!(res.status(), 200, "job {id}");
        let etag = res.headers()["etag"].to_str().unwrap().to_owned();
        Some((etag, res.json().await.unwrap()))
    }
}

/// What an agent tells the server about its VM (`name` in `sub-1`, resource group `rg`).
pub fn vm_facts(name: &str) -> Value {
    json!({"name": name, "resource_group": "rg", "subscription_id": "sub-1", "region": "westeurope",
        "deployment_model": "resource_manager", "agent_version": "1", "dotnet_version": "4.8",
        "sql_iaas_extension": true, "other_backup_product": false})
}
