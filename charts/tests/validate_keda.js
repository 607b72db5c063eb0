// Reads a JSON array of KEDA objects on stdin; validates each against KEDA's CRD
// schema (@kubernetes-models/keda). Prints one JSON line per object:
// {"name": ..., "errors": [...]} and exits 1 if any object is invalid.
"use strict";
const { ScaledObject } = require("@kubernetes-models/keda/keda.sh/v1alpha1");

let input = "";
process.stdin.on("data", (d) => (input += d));
process.stdin.on("end", () => {
  const objects = JSON.parse(input);
  let bad = 0;
  for (const o of objects) {
    let errors = [];
    if (o.kind !== "ScaledObject") {
      errors = [`unexpected kind ${o.kind}`];
    } else {
      try {
        new ScaledObject(o).validate();
      } catch (e) {
        errors = e.errors ? e.errors.map((x) => `${x.instancePath} ${x.message || x.keyword}`) : [String(e)];
      }
    }
    if (errors.length) bad++;
    console.log(JSON.stringify({ name: o.metadata && o.metadata.name, errors }));
  }
  process.exit(bad ? 1 : 0);
});
