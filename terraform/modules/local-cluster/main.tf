# A local multi-node cluster with demo apps, as `portcullis up --detach` makes it, managed as a
# Terraform resource: apply starts it, destroy stops it. Uses only Terraform's built-in
# `terraform_data`, so it needs no provider download; the cluster tests apply it for real.

terraform {
  required_version = ">= 1.5"
}

variable "portcullis_bin" {
  description = "Path to the portcullis binary."
  type        = string
}

variable "state_dir" {
  description = "Directory for the cluster (cluster.json, PKI, node data, logs). Absolute."
  type        = string
  validation {
    condition     = startswith(var.state_dir, "/")
    error_message = "state_dir must be an absolute path: destroy runs from Terraform's working directory."
  }
}

variable "nodes" {
  type    = number
  default = 3
  validation {
    condition     = var.nodes >= 1 && var.nodes <= 9
    error_message = "A local cluster has 1 to 9 nodes."
  }
}

variable "regions" {
  type    = list(string)
  default = ["us-east", "eu-west", "ap-south"]
}

resource "terraform_data" "cluster" {
  # Any change means a new cluster: stop the old one, start afresh.
  input = {
    bin       = var.portcullis_bin
    state_dir = var.state_dir
    nodes     = var.nodes
    regions   = join(",", var.regions)
  }

  provisioner "local-exec" {
    command = "\"$BIN\" up --detach --nodes \"$NODES\" --regions \"$REGIONS\" --state-dir \"$DIR\""
    environment = {
      BIN     = self.input.bin
      NODES   = tostring(self.input.nodes)
      REGIONS = self.input.regions
      DIR     = self.input.state_dir
    }
  }

  provisioner "local-exec" {
    when    = destroy
    command = "\"$BIN\" down --state-dir \"$DIR\""
    environment = {
      BIN = self.input.bin
      DIR = self.input.state_dir
    }
  }
}

output "cluster_dir" {
  description = "Pass as `portcullis --cluster DIR`; DIR/cluster.json lists every node (ARCHITECTURE.md §8)."
  value       = terraform_data.cluster.output.state_dir
}
