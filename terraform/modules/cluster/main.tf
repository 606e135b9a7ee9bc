# A gateway cluster's per-host cloud-init user data: configuration, credentials, a systemd unit,
# and on one node a oneshot unit that bootstraps Raft once every founding member is up.
# Provider-agnostic: feed `user_data` to any cloud's instance resource (see ../../examples/aws).
#
# Credentials come from `portcullis cluster init --pki DIR --node-id 1,2,3` run beforehand on an
# operator machine; this module reads DIR. The CA key (DIR/ca.key) is never read or shipped.

terraform {
  required_version = ">= 1.5"
}

variable "nodes" {
  description = "Founding members. advertise_ip must be known before the hosts exist (a reserved private IP)."
  type = list(object({
    id           = number
    region       = string
    advertise_ip = string
    latitude     = optional(number, 0)
    longitude    = optional(number, 0)
  }))
  validation {
    condition     = length(var.nodes) >= 1 && length(distinct([for n in var.nodes : n.id])) == length(var.nodes)
    error_message = "Give at least one node, with distinct ids."
  }
}

variable "base_domains" {
  type = list(string)
}

variable "pki_dir" {
  description = "Directory written by `portcullis cluster init --pki DIR --node-id ...`."
  type        = string
}

variable "install_command" {
  description = "Shell command that puts the portcullis binary at /usr/local/bin/portcullis."
  type        = string
  default     = "test -x /usr/local/bin/portcullis"
}

variable "acme" {
  description = "Passed to every node (see modules/node-config); null leaves ACME off."
  type = object({
    directory = optional(string, "https://acme-v02.api.letsencrypt.org/directory")
    contact   = optional(list(string), [])
    challenge = optional(string, "http-01")
  })
  default = null
}

module "node" {
  source   = "../node-config"
  for_each = { for n in var.nodes : tostring(n.id) => n }

  node_id      = each.value.id
  region       = each.value.region
  latitude     = each.value.latitude
  longitude    = each.value.longitude
  advertise_ip = each.value.advertise_ip
  base_domains = var.base_domains
  acme         = var.acme
}

locals {
  bootstrap_id = tostring(min([for n in var.nodes : n.id]...))
  members      = join(" ", [for id, m in module.node : "--member ${m.member}"])
  ca_pem       = file("${var.pki_dir}/ca.pem")
  token        = trimspace(file("${var.pki_dir}/admin.token"))
  data_key     = trimspace(file("${var.pki_dir}/data.key"))

  user_data = {
    for id, m in module.node : id => templatefile("${path.module}/cloud-init.yaml.tftpl", {
      node_id         = id
      config_toml     = m.config_toml
      ca_pem          = local.ca_pem
      cert_pem        = file("${var.pki_dir}/node-${id}/cert.pem")
      key_pem         = file("${var.pki_dir}/node-${id}/key.pem")
      token           = local.token
      data_key        = local.data_key
      install_command = var.install_command
      bootstrap       = id == local.bootstrap_id
      members         = local.members
    })
  }
}

output "user_data" {
  description = "cloud-init user data per node id (contains the node key, admin token and data key)."
  value       = local.user_data
  sensitive   = true
}

output "config_toml" {
  description = "Each node's rendered config file, by node id (no secrets)."
  value       = { for id, m in module.node : id => m.config_toml }
}

output "members" {
  description = "The `cluster init` member flags the bootstrap node uses."
  value       = local.members
}
