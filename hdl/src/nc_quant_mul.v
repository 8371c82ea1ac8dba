// Quantiser, first stage: classify a bfloat16 input x and a float32 inverse scale s and form
// the exact product of their significands (8 x 24 bits). The value is prod * 2^(e - 30).
// Subnormal x or s flush to zero (see qlib/hdl/model.py for why this never changes a code).
`default_nettype none
module nc_quant_mul (
    input  wire [15:0] x,
    input  wire [31:0] s,
    output reg  [1:0]  kind,     // 0: zero, 1: number, 2: NaN, 3: infinity
    output wire        sign,
    output wire [9:0]  e,        // unbiased, two's complement
    output wire [31:0] prod,
    output wire        x_nan,
    output wire        x_inf
);
    wire [7:0] xe = x[14:7];
    wire [7:0] se = s[30:23];
    wire xz = (xe == 8'd0), sz = (se == 8'd0);
    assign x_inf = (xe == 8'hFF) && (x[6:0] == 7'd0);
    assign x_nan = (xe == 8'hFF) && (x[6:0] != 7'd0);
    wire s_inf = (se == 8'hFF) && (s[22:0] == 23'd0);
    wire s_nan = (se == 8'hFF) && (s[22:0] != 23'd0);
    assign sign = x[15] ^ s[31];
    assign e = {2'd0, xe} + {2'd0, se} - 10'd254;
    assign prod = {1'b1, x[6:0]} * {1'b1, s[22:0]};             // in [2^30, 2^32)
    always @(*) begin
        if (x_nan | s_nan | (x_inf & sz) | (s_inf & xz)) kind = 2'd2;
        else if (x_inf | s_inf)                          kind = 2'd3;
        else if (xz | sz)                                kind = 2'd0;
        else                                             kind = 2'd1;
    end
endmodule
`default_nettype wire
