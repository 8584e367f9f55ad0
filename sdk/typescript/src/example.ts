import createClient from "openapi-fetch";
import type { paths } from "./schema.js";

const api = createClient<paths>({
  baseUrl: process.env["BASE_URL"],
  headers: { Authorization: `Bearer ${process.env["ADMIN_TOKEN"]}` },
});
const body = {
  name: `docs-${Math.random().toString(36).slice(2, 10)}`,
  subscription_id: process.env["BV_SUBSCRIPTION_ID"] ?? "sub-1",
  resource_group: "rg-sql",
  region: "westeurope",
};

const created = await api.POST("/v1/vaults", { body });
if (!created.data) throw new Error(`create: ${created.response.status}`);
console.log(created.response.status, created.data.id, created.response.headers.get("etag"));

const again = await api.POST("/v1/vaults", { body });
if (!again.error) throw new Error("a second vault of that name was created");
console.log(again.response.status, again.error.code); // 409 vault_name_taken: a typed Problem
